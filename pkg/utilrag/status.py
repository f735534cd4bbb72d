"""``utilrag status`` and ``utilrag pipeline --dry-run``: the stage folders a config asks for, in
pipeline order, and the state of each from its manifest and lease, without starting Ray or a model.

States: ``complete``; ``running`` (its lease's holder is alive: which job, where); ``interrupted`` (the
manifest says running but its holder is gone, or left no lease: a rerun redoes or resumes it);
``failed`` (committed above a threshold: ingest's rejects, annotation's error rows); ``missing``. A
complete folder is reused by the next run only if its inputs' fingerprint still matches: the stage
decides that when it runs (``pipeline`` logs "reusing" or redoes it).
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass, field

from pydantic import ValidationError

from utilrag import lease, store
from utilrag.config import PipelineConfig
from utilrag.pipeline import select_stages
from utilrag.plan import index_targets
from utilrag.report.collect import discover
from utilrag.report.render import Table, to_markdown
from utilrag.stages import get_stage
from utilrag.store import Store
from utilrag.summaries import AnnotateSummary, IngestSummary, StageSummary


@dataclass
class FolderState:
    stage: str
    folder: str  # relative to the run directory
    state: str  # complete | running | interrupted | failed | missing
    detail: str = ""  # the lease holder, or why it is not complete
    written_at: str | None = None
    wall_s: float | None = None
    outputs: list[str] = field(default_factory=list)
    in_config: bool = True  # false: in the run directory, but not asked for by this config


def planned(cfg: PipelineConfig, stages: list[str]) -> list[tuple[str, str]]:
    """(stage, folder) for every folder the given stages write under this config, in pipeline order."""
    from utilrag.index.candidates import candidate_targets

    at = Store(cfg.output_dir)
    annotate = cfg.annotate
    early = [(t.dataset, t.split, t.run_label()) for t in candidate_targets(cfg)]  # searched before the pools
    folders: dict[str, list[str]] = {
        "ingest": [at.ingest(d.name) for d in cfg.ingest.datasets],
        "querygen": [at.querygen(cfg.querygen.dataset, "queries")] if cfg.querygen else [],
        "candidates": [at.dense_run(*key) for key in early],
        "pools": [at.pools(p.dataset, p.split) for p in cfg.pools],
        "bm25": [at.bm25(b.dataset, b.split) for b in cfg.bm25],
        "annotate": [at.annotate(t.dataset, t.split, annotate.output_name) for t in annotate.targets]
        if annotate
        else [],
        "train": [at.train(r.name) for r in cfg.train.runs()],
        "index": [
            at.dense_run(t.dataset, t.split, t.run_label())
            for t in index_targets(cfg)
            if (t.dataset, t.split, t.run_label()) not in early
        ],
        "judge": [at.judge(t.dataset, t.split, "qrels") for t in cfg.judge.targets] if cfg.judge else [],
        "evaluate": [at.evaluate()],
        "rag": [at.rag(cfg.rag.dataset, "report")] if cfg.rag else [],
        "report": [at.report()],
    }
    return [(s, _relative(at.root, f)) for s in stages for f in folders.get(s, [])]


def _relative(root: str, location: str) -> str:
    return posixpath.relpath(location, root) if not store.is_remote(root) else location[len(root) :].strip("/")


def folder_state(root: str, stage: str, rel: str, in_config: bool = True) -> FolderState:
    location = store.join(root, *rel.split("/"))
    manifest = store.read_manifest(location)
    if manifest is None:
        return FolderState(stage, rel, "missing", in_config=in_config)
    state, detail = manifest.get("status", "?"), ""
    if state == "running":
        record = store.read_json(store.join(location, lease.LEASE))
        if record is None:
            state, detail = "interrupted", "no lease: its job ended without committing"
        else:
            alive, why = lease.holder_state(record)
            who = lease.describe(record)
            state, detail = ("running", f"{who}, {why}") if alive == "alive" else ("interrupted", f"{who}: {why}")
    try:
        summary = get_stage(stage).summary.of(manifest)
    except ValidationError as e:  # hand-edited, or written by other code
        summary = StageSummary()
        detail = f"manifest not readable as a {stage} summary ({e.errors()[0]['loc']})"
    if state == "failed":
        detail = _failure(summary)
    return FolderState(
        stage,
        rel,
        state,
        detail,
        manifest.get("written_at"),
        summary.wall(),
        list(manifest.get("outputs") or []),
        in_config,
    )


def _failure(summary: StageSummary) -> str:
    """Why a committed output failed its threshold: annotation's error rows, ingest's rejects."""
    if isinstance(summary, AnnotateSummary) and summary.errors.get("rows"):
        return f"{summary.errors['rows']:,} error rows ({float(summary.errors.get('share', 0)):.3%})"
    if isinstance(summary, IngestSummary):
        return "rejected rows: " + ", ".join(f"{t} {n:,}" for t, n in summary.rejected.items() if n)
    return ""


def status(cfg: PipelineConfig, stages: list[str] | None = None) -> list[FolderState]:
    """The config's folders (all its configured stages, or ``stages``), then any other stage folder
    found in the run directory."""
    names = stages if stages is not None else select_stages(cfg)
    root = Store(cfg.output_dir).root
    wanted = planned(cfg, names)
    states = [folder_state(root, stage, rel) for stage, rel in wanted]
    if stages is None:
        seen = {rel for _, rel in wanted}
        states += [folder_state(root, f.stage, f.rel, False) for f in discover(root) if f.rel not in seen]
    return states


def render(cfg: PipelineConfig, states: list[FolderState], title: str) -> str:
    rows = [
        [
            s.stage,
            s.folder + ("" if s.in_config else " (not in this config)"),
            s.state,
            f"{s.wall_s:,.0f}s" if s.wall_s is not None else "",
            s.written_at or "",
            s.detail,
        ]
        for s in states
    ]
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    table = Table(["stage", "folder", "state", "wall", "written", "detail"], rows, right={3})
    return f"{title}: {Store(cfg.output_dir).root}\n\n{to_markdown([table])}\n{summary}"


def as_json(cfg: PipelineConfig, states: list[FolderState], **extra) -> dict:
    return {"output_dir": Store(cfg.output_dir).root, **extra, "folders": [asdict(s) for s in states]}
