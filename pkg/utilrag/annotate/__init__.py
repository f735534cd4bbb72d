"""Annotate stage: the paper's LLM judgments (RelSel -> pseudo-answer -> UtilSel / UtilRank, and an
optional pointwise 0-3 judge) with vLLM on a Ray Data actor pool, into Parquet, resumable; then the
labels table and the agreement report.

Outputs under output_dir/annotate/<dataset>-<split>[-<output_name>]/:
``<stage>.parquet`` (one row per query and window), ``labels.parquet``, ``rejects.parquet``,
``report.md`` / ``report.json`` / ``agreement.png``.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq

from utilrag import store
from utilrag.annotate.engine import AnnotateError, check_model, resolve_llm
from utilrag.annotate.prompts import PROMPT_VERSION
from utilrag.annotate.report import (
    agreement,
    agreement_by_position,
    graded_kappa,
    render_markdown,
    write_report,
)
from utilrag.annotate.runner import run_stage
from utilrag.annotate.stages import (
    NEEDS,
    REJECTS_SCHEMA,
    STAGE_ORDER,
    build_labels,
    build_requests,
    load_inputs,
    shown_positions,
)
from utilrag.config import AnnotateConfig, AnnotateTarget, PipelineConfig
from utilrag.data.dataset import open_dataset
from utilrag.data.tables import fingerprint, read_table
from utilrag.logs import get_logger
from utilrag.stages import StageResult
from utilrag.store import Store, read_manifest

log = get_logger("annotate")

__all__ = ["run_annotate", "annotate_target", "print_reports", "target_dir", "AnnotateError"]


def annotate_config(cfg: PipelineConfig) -> AnnotateConfig:
    if cfg.annotate is None:
        raise AnnotateError("the config has no annotate section (annotate: {model, targets: [{dataset, split}]})")
    return cfg.annotate


def target_dir(cfg: PipelineConfig, target: AnnotateTarget) -> str:
    return Store(cfg.output_dir).annotate(target.dataset, target.split, annotate_config(cfg).output_name)


def run(cfg: PipelineConfig) -> StageResult:
    """The annotation stage."""
    t0 = time.time()
    return StageResult("annotate", [str(p) for p in run_annotate(cfg)], wall_s=time.time() - t0)


def run_annotate(cfg: PipelineConfig) -> list[str]:
    acfg = cfg.annotate
    if acfg is None or not acfg.targets:
        raise AnnotateError("the config has no annotate section with targets (annotate.targets: [{dataset, split}])")
    model_path = resolve_llm(acfg.model)
    check_model(model_path, acfg.engine.use_gpu)
    from utilrag.raycluster import connect

    connect(cfg.ray)
    return [annotate_target(cfg, target, model_path) for target in acfg.targets]


def annotate_target(cfg: PipelineConfig, target: AnnotateTarget, model_path: str) -> str:
    acfg = annotate_config(cfg)
    label = f"{target.dataset}/{target.split}"
    pools_done = store.require(Store(cfg.output_dir).pools(target.dataset, target.split), f"annotate: pools of {label}")
    dataset = open_dataset(cfg, target.dataset)
    if not dataset.has("corpus"):
        raise AnnotateError(f"annotate: dataset {target.dataset!r} has no corpus")
    out = target_dir(cfg, target)
    t0 = time.time()
    pools = read_table(pools_done.path("pools.parquet"))
    inputs = load_inputs(pools, dataset.table("queries"), dataset.committed.path("corpus"), target, acfg)
    base = {
        "pools": pools_done["input_fingerprint"],
        "target": target.model_dump(),
        "prompt_version": PROMPT_VERSION,
        "settings": acfg.content_settings(),
    }
    check_stage_order(out, base, acfg)  # before begin: a config mistake keeps the committed labels
    # The labels and report are this folder's committed outputs; the per-stage tables and parts
    # beside them have their own manifests (<stage>.meta), so a rerun resumes them exactly once.
    writer = store.begin(out, "annotate", None)
    staging = writer.local_path(".")
    pq.write_table(
        pa.table(
            {k: [r[i] for r in inputs.rejects] for i, k in enumerate(REJECTS_SCHEMA.names)}, schema=REJECTS_SCHEMA
        ),
        staging / "rejects.parquet",
    )
    log.info(
        f"{label}: {len(inputs.pools):,} queries to annotate, {len(inputs.rejects):,} rejects "
        f"({store.join(out, 'rejects.parquet')}), {len(inputs.cut):,} passages cut to {acfg.passage_words} words"
    )
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
            log.info(f"{label} {stage}: skipped queries {skipped}")
        done[stage], summaries[stage] = run_stage(stage, requests, out, fingerprints[stage], acfg, model_path, label)
        summaries[stage]["skipped_queries"] = skipped
    all_pools = _pool_docs(pools)
    labels = build_labels(inputs, done, all_pools, acfg)
    pq.write_table(labels, staging / "labels.parquet")
    shown = shown_positions(done["relsel"]) if "relsel" in done else None
    text = write_report(staging, label, labels, summaries, acfg.model, shown)
    # The labels' identity (what training fingerprints): the stage results they were built from and
    # the settings that turn those into labels.
    writer.fingerprint = fingerprint(
        {
            "stages": fingerprints,
            "labels": acfg.model_dump(include={"utilrank_top_percent", "graded_threshold", "human_positive"}),
        }
    )
    writer.commit(rows={"labels": labels.num_rows}, summaries=summaries, wall_time_s=round(time.time() - t0, 2))
    print(text, flush=True)
    log.info(
        f"{label}: labels {labels.num_rows:,} rows -> {store.join(out, 'labels.parquet')} ({time.time() - t0:.0f}s)"
    )
    return out


def check_stage_order(out: str, base: dict, acfg: AnnotateConfig) -> None:
    """Every stage asked for has its input stage asked for too, or finished before with the same inputs."""
    fingerprints: dict[str, str] = {}
    available = set()
    for stage in STAGE_ORDER:
        fp = _stage_fingerprint(stage, base, fingerprints, acfg)
        if stage in acfg.stages:
            need = NEEDS.get(stage)
            if need and need not in available:
                raise AnnotateError(
                    f"annotate.stages asks for {stage!r}, which needs the {need!r} stage's output; add "
                    f"{need!r} to annotate.stages"
                )
        else:
            meta = read_manifest(store.join(out, f"{stage}.meta"))
            if not (meta and meta.get("status") == "complete" and meta.get("fingerprint") == fp):
                continue
        fingerprints[stage] = fp
        available.add(stage)


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


def _finished(out: str, stage: str, fp: str):
    meta = read_manifest(store.join(out, f"{stage}.meta"))
    final = store.join(out, f"{stage}.parquet")
    if meta and meta.get("status") == "complete" and meta.get("fingerprint") == fp and store.exists(final):
        return read_table(final), meta["summary"]
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
        committed = store.require(out, f"annotate-report: the annotation of {target.dataset}/{target.split}")
        labels = read_table(committed.path("labels.parquet"))
        summaries = committed.get("summaries", {})
        rows = agreement(labels, summaries)  # printed only: the committed report files stay as written
        relsel = store.join(out, "relsel.parquet")
        by_position = agreement_by_position(labels, shown_positions(read_table(relsel))) if store.exists(relsel) else []
        label = f"{target.dataset}/{target.split}"
        print(render_markdown(label, rows, graded_kappa(labels), acfg.model, by_position), flush=True)
