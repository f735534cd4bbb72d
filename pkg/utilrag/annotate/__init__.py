"""Annotate stage: the paper's LLM judgments (RelSel -> pseudo-answer -> UtilSel / UtilRank, and an
optional pointwise 0-3 judge) with vLLM on a Ray Data actor pool, into Parquet, resumable; then the
labels table and the agreement report.

Outputs under output_dir/annotate/<dataset>-<split>[-<output_name>]/:
``<stage>.parquet`` (one row per query and window), ``labels.parquet``, ``rejects.parquet``,
``report.md`` / ``report.json`` / ``agreement.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from utilrag.annotate.engine import AnnotateError, check_model, resolve_llm
from utilrag.annotate.prompts import PROMPT_VERSION
from utilrag.annotate.report import write_report
from utilrag.annotate.runner import run_stage
from utilrag.annotate.stages import NEEDS, REJECTS_SCHEMA, STAGE_ORDER, build_labels, build_requests, load_inputs
from utilrag.config import AnnotateConfig, AnnotateTarget, PipelineConfig
from utilrag.data.ingest import IngestError, dataset_dir
from utilrag.data.tables import fingerprint, read_manifest, read_table

__all__ = ["run_annotate", "annotate_target", "print_reports", "target_dir", "AnnotateError"]

# Settings that change what a stage's rows contain (engine scale settings do not: a stage can be
# resumed with another batch size or replica count).
CONTENT_SETTINGS = {
    "model",
    "window",
    "passage_words",
    "human_positive",
    "temperature",
    "top_p",
    "seed",
    "max_tokens",
    "answer_max_tokens",
    "constrained",
    "dtype",
    "quantization",
    "max_model_len",
}


def annotate_config(cfg: PipelineConfig) -> AnnotateConfig:
    if cfg.annotate is None:
        raise AnnotateError("the config has no annotate section (annotate: {model, targets: [{dataset, split}]})")
    return cfg.annotate


def target_dir(cfg: PipelineConfig, target: AnnotateTarget) -> Path:
    output_name = annotate_config(cfg).output_name
    suffix = f"-{output_name}" if output_name else ""
    return Path(cfg.output_dir) / "annotate" / f"{target.dataset}-{target.split}{suffix}"


def run_annotate(cfg: PipelineConfig) -> list[Path]:
    acfg = cfg.annotate
    if acfg is None or not acfg.targets:
        raise AnnotateError("the config has no annotate section with targets (annotate.targets: [{dataset, split}])")
    model_path = resolve_llm(acfg.model)
    check_model(model_path, acfg.use_gpu)
    from utilrag.raycluster import connect

    connect(cfg.ray)
    return [annotate_target(cfg, target, model_path) for target in acfg.targets]


def annotate_target(cfg: PipelineConfig, target: AnnotateTarget, model_path: str) -> Path:
    acfg = annotate_config(cfg)
    label = f"{target.dataset}/{target.split}"
    pools_dir = Path(cfg.output_dir) / "pools" / f"{target.dataset}-{target.split}"
    if not (pools_dir / "pools.parquet").is_file():
        raise IngestError(f"annotate: no pools at {pools_dir}; run `utilrag pools` for {label} first")
    source = dataset_dir(cfg, target.dataset)
    out = target_dir(cfg, target)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pools = read_table(pools_dir / "pools.parquet")
    inputs = load_inputs(pools, read_table(source / "queries"), source / "corpus", target, acfg)
    pq.write_table(
        pa.table(
            {k: [r[i] for r in inputs.rejects] for i, k in enumerate(REJECTS_SCHEMA.names)}, schema=REJECTS_SCHEMA
        ),
        out / "rejects.parquet",
    )
    print(
        f"[annotate] {label}: {len(inputs.pools):,} queries to annotate, {len(inputs.rejects):,} rejects "
        f"({out / 'rejects.parquet'}), {len(inputs.cut):,} passages cut to {acfg.passage_words} words",
        flush=True,
    )
    base = {
        "pools": (read_manifest(pools_dir) or {}).get("input_fingerprint"),
        "target": target.model_dump(),
        "prompt_version": PROMPT_VERSION,
        "settings": acfg.model_dump(include=CONTENT_SETTINGS),
    }
    wanted = [s for s in STAGE_ORDER if s in acfg.stages]
    done: dict[str, pa.Table] = {}
    summaries: dict[str, dict] = {}
    fingerprints: dict[str, str] = {}
    for stage in STAGE_ORDER:
        fp = _stage_fingerprint(stage, base, fingerprints, acfg)
        if stage not in wanted:
            # A stage not asked for now but finished before (same inputs) still feeds labels.
            previous = _finished(out, stage, fp)
            if previous is not None:
                done[stage], summaries[stage] = previous
                fingerprints[stage] = fp
            continue
        need = NEEDS.get(stage)
        if need and need not in done:
            raise AnnotateError(
                f"annotate.stages asks for {stage!r}, which needs the {need!r} stage's output; add "
                f"{need!r} to annotate.stages"
            )
        fingerprints[stage] = fp
        requests, skipped = build_requests(stage, inputs, acfg, done, graded_seed=label)
        if skipped:
            print(f"[annotate] {label} {stage}: skipped queries {skipped}", flush=True)
        done[stage], summaries[stage] = run_stage(stage, requests, out, fingerprints[stage], acfg, model_path, label)
        summaries[stage]["skipped_queries"] = skipped
    all_pools = _pool_docs(pools)
    labels = build_labels(inputs, done, all_pools, acfg)
    pq.write_table(labels, out / "labels.parquet")
    text = write_report(out, label, labels, summaries, acfg.model)
    print(text, flush=True)
    print(
        f"[annotate] {label}: labels {labels.num_rows:,} rows -> {out / 'labels.parquet'} ({time.time() - t0:.0f}s)",
        flush=True,
    )
    return out


def _stage_fingerprint(stage: str, base: dict, upstream: dict[str, str], acfg: AnnotateConfig) -> str:
    parts = {
        **base,
        "stage": stage,
        "upstream": {
            s: upstream.get(s)
            for s in ("relsel", "answer")
            if stage != s and STAGE_ORDER.index(s) < STAGE_ORDER.index(stage)
        },
    }
    if stage == "graded":
        parts["graded_queries"] = acfg.graded_queries
        parts["upstream"] = {}
    return fingerprint(parts)


def _finished(out: Path, stage: str, fp: str):
    meta = read_manifest(out / f"{stage}.meta")
    if (
        meta
        and meta.get("status") == "complete"
        and meta.get("fingerprint") == fp
        and (out / f"{stage}.parquet").is_file()
    ):
        return pq.read_table(out / f"{stage}.parquet"), meta["summary"]
    return None


def _pool_docs(pools: pa.Table) -> dict[str, list[str]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for q, d, pos in zip(*(pools.column(c).to_pylist() for c in ["query_id", "doc_id", "position"])):
        out.setdefault(q, []).append((pos, d))
    return {q: [d for _, d in sorted(v)] for q, v in out.items()}


def print_reports(cfg: PipelineConfig) -> None:
    """``utilrag annotate-report``: the agreement tables of the finished annotations, re-rendered."""
    acfg = cfg.annotate
    if acfg is None or not acfg.targets:
        raise AnnotateError("the config has no annotate section with targets")
    for target in acfg.targets:
        out = target_dir(cfg, target)
        if not (out / "labels.parquet").is_file():
            raise AnnotateError(f"no labels at {out / 'labels.parquet'}; run `utilrag annotate` first")
        summaries = {}
        for stage in STAGE_ORDER:
            meta = read_manifest(out / f"{stage}.meta")
            if meta and meta.get("status") == "complete":
                summaries[stage] = meta["summary"]
        print(
            write_report(
                out, f"{target.dataset}/{target.split}", pq.read_table(out / "labels.parquet"), summaries, acfg.model
            ),
            flush=True,
        )
