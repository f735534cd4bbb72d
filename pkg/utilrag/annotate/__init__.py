"""Annotate stage: the paper's LLM judgments (RelSel -> pseudo-answer -> UtilSel / UtilRank, and an
optional pointwise 0-3 judge) with vLLM on a Ray Data actor pool, streaming from Parquet to Parquet,
resumable exactly once; then the labels table and the agreement report.

Outputs under output_dir/annotate/<dataset>-<split>[-<output_name>]/:
``<stage>.parquet`` (one row per query and window), ``labels.parquet``, ``rejects.parquet``,
``report.md`` / ``report.json`` / ``agreement.png``; and the job's own ``inputs/`` (one row per
query), ``chain.parts/`` (one part per block of queries) with their ``.meta`` manifests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

from utilrag import lease, store
from utilrag.annotate import job
from utilrag.annotate.engine import AnnotateError, check_model, resolve_llm
from utilrag.annotate.job import summary_line
from utilrag.annotate.prompts import PROMPT_VERSION, RAG_PROMPT_VERSION
from utilrag.annotate.report import (
    agreement,
    agreement_by_position,
    graded_kappa,
    render_markdown,
    write_report,
)
from utilrag.annotate.stages import NEEDS, STAGE_ORDER, shown_positions
from utilrag.config import QA_METRIC_STAGE, AnnotateConfig, AnnotateTarget, PipelineConfig
from utilrag.data.dataset import open_dataset
from utilrag.data.tables import fingerprint, read_table
from utilrag.logs import get_logger
from utilrag.plan import annotate_stages
from utilrag.raycluster import connect
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import AnnotateSummary

log = get_logger("annotate")

__all__ = ["run_annotate", "annotate_target", "annotate_pools", "Chain", "print_reports", "target_dir", "AnnotateError"]


def annotate_config(cfg: PipelineConfig) -> AnnotateConfig:
    """The annotate section with the stages this config runs (annotate.stages, or the plan's)."""
    if cfg.annotate is None:
        raise AnnotateError("the config has no annotate section (annotate: {model, targets: [{dataset, split}]})")
    return cfg.annotate.model_copy(update={"stages": annotate_stages(cfg)})


def target_dir(cfg: PipelineConfig, target: AnnotateTarget) -> str:
    return Store(cfg.output_dir).annotate(target.dataset, target.split, annotate_config(cfg).output_name)


def run(cfg: PipelineConfig) -> StageResult:
    """The annotation stage."""
    t0 = time.time()
    return StageResult("annotate", [str(p) for p in run_annotate(cfg)], wall_s=time.time() - t0)


def run_annotate(cfg: PipelineConfig) -> list[str]:
    if cfg.annotate is None or not cfg.annotate.targets:
        raise AnnotateError("the config has no annotate section with targets (annotate.targets: [{dataset, split}])")
    acfg = annotate_config(cfg)
    if not acfg.stages:
        raise AnnotateError("annotate: no stage to run (no train setting reads LLM labels; set annotate.stages)")
    model_path = resolve_llm(acfg.model)
    check_model(model_path, acfg.engine.use_gpu)
    return [annotate_target(cfg, target, model_path) for target in acfg.targets]


def annotate_target(cfg: PipelineConfig, target: AnnotateTarget, model_path: str, engine_factory=None) -> str:
    """One target, streaming (annotate/job.py): inputs -> the chain of stages per block of queries on
    one engine per replica -> stage tables, labels and the report. ``engine_factory``: a stand-in
    engine for the data-plane benchmark (never set by the pipeline)."""
    acfg = annotate_config(cfg)
    label = f"{target.dataset}/{target.split}"
    pools_done = store.require(Store(cfg.output_dir).pools(target.dataset, target.split), f"annotate: pools of {label}")
    dataset = open_dataset(cfg, target.dataset)
    if not dataset.has("corpus"):
        raise AnnotateError(f"annotate: dataset {target.dataset!r} has no corpus")
    check_stage_needs(acfg)  # before begin: a config mistake keeps the committed labels
    gold, gold_fp = (None, None)
    if QA_METRIC_STAGE in acfg.chain_stages():
        gold, gold_fp = gold_answers(cfg, acfg, target)
        check_gold_coverage(gold, pools_done.path("pools.parquet"), acfg.qametric.answers or target.dataset, label)
    chain = Chain(
        out=target_dir(cfg, target),
        paths={
            "pools": pools_done.path("pools.parquet"),
            "queries": dataset.location("queries"),
            "corpus": dataset.location("corpus"),
        },
        pools_fingerprint=pools_done["input_fingerprint"],
        key=target.model_dump(),
        label=label,
        max_queries=target.max_queries,
        sample_seed=f"annotate:{target.dataset}:{target.split}",
        gold_answers=gold,
        gold_fingerprint=gold_fp,
    )
    return annotate_pools(cfg, acfg, chain, model_path, engine_factory)


def check_gold_coverage(gold: dict[str, list[str]], pools: str, source: str, label: str) -> None:
    """How many pooled queries have a gold answer: none is a wrong answers dataset (one line, before any
    generation), some is said (a query without one costs its generations and gets no positive)."""
    pooled = set(read_table(pools, columns=["query_id"]).column("query_id").to_pylist())
    answered = sum(bool(gold.get(q)) for q in pooled)
    if not answered:
        raise AnnotateError(
            f"annotate: none of the {len(pooled):,} pooled queries of {label} has a gold answer in {source!r}'s qa "
            "table (annotate.qametric.answers: a QA dataset whose question ids are these queries' ids)"
        )
    log.info(f"{label}: {answered:,} of {len(pooled):,} pooled queries have gold answers in {source!r}")


def gold_answers(cfg: PipelineConfig, acfg: AnnotateConfig, target: AnnotateTarget) -> tuple[dict, str]:
    """The QA-metric stage's gold answers (query id -> answers) and their fingerprint: the qa table of
    annotate.qametric.answers, or of the annotated dataset."""
    name = acfg.qametric.answers or target.dataset
    dataset = open_dataset(cfg, name)
    if not dataset.has("qa"):
        raise AnnotateError(
            f"annotate: the qametric stage scores answers against gold answers, and dataset {name!r} has none (a "
            "question-answering layout has them: set annotate.qametric.answers to an ingested QA dataset whose "
            f"question ids are {target.dataset!r}'s, e.g. MS MARCO QnA for MS MARCO)"
        )
    qa = dataset.table("qa", ["query_id", "answers"])
    answers = dict(zip(qa.column("query_id").to_pylist(), qa.column("answers").to_pylist()))
    return answers, dataset.committed["input_fingerprint"]


@dataclass
class Chain:
    """What one run of the annotation chain reads and where it writes: the annotate stage's targets, and
    the querygen and judge stages' own pools (their prompts run on the same runner)."""

    out: str  # the committed folder: labels, stage tables, report
    paths: dict[str, str]  # pools, queries, corpus
    pools_fingerprint: str
    key: dict  # what else names the input (the annotate target as written)
    label: str
    max_queries: int | None
    sample_seed: str
    stage: str = "annotate"  # the stage writing ``out`` (its lease and manifest)
    gold_answers: dict[str, list[str]] | None = None  # what the QA-metric stage's answers are scored against
    gold_fingerprint: str | None = None


def annotate_pools(
    cfg: PipelineConfig, acfg: AnnotateConfig, chain: Chain, model_path: str, engine_factory=None
) -> str:
    """The chain over one pools table: inputs -> stage rows per block of queries -> labels and report."""
    out, paths, label = chain.out, chain.paths, chain.label
    # inputs/ and chain.parts/ are written before the labels' begin: the folder's lease covers them too.
    with lease.holding(store.normalize(out), chain.stage):
        t0 = time.time()
        inputs_fp = fingerprint(
            {
                "pools": chain.pools_fingerprint,
                "target": chain.key,
                "inputs": acfg.model_dump(include={"passage_words", "human_positive"}),
            }
        )
        wanted = job.sample_queries(paths["pools"], chain.max_queries, chain.sample_seed)
        ray_up = partial(connect, cfg.ray)  # Ray only for work left: a finished target starts no cluster
        job.ensure_inputs(out, inputs_fp, paths, acfg, wanted, label, ray_up)
        stages = [s for s in STAGE_ORDER if s in acfg.chain_stages()]
        chain_fp = fingerprint(
            {
                "inputs": inputs_fp,
                "prompt_version": PROMPT_VERSION,
                "settings": acfg.content_settings(),
                "stages": stages,
                "graded_queries": acfg.graded_queries if "graded" in stages else None,
                # the answers' length (a key only with the stage: the other chains' fingerprints hold)
                **(
                    {"qametric_max_tokens": acfg.qametric.max_tokens, "qametric_prompt": RAG_PROMPT_VERSION}
                    if QA_METRIC_STAGE in stages
                    else {}
                ),
            }
        )
        inputs = store.join(out, "inputs")
        graded_ids = job.graded_sample(inputs, acfg.graded_queries, f"graded:{label}") if "graded" in stages else None
        run = job.new_run_id()
        stats = job.run_chain(out, chain_fp, acfg, model_path, label, graded_ids, run, engine_factory, ray_up)
        # The labels and report are this folder's committed outputs; inputs/, chain.parts and the stage
        # tables beside them have their own manifests, so a rerun resumes them exactly once.
        writer = store.begin(out, chain.stage, None)
        staging = writer.local_path(".")
        annotated, rejects, cut = job.write_rejects(inputs, str(staging / "rejects.parquet"))
        log.info(
            f"{label}: {annotated:,} queries annotated, {rejects:,} rejects ({store.join(out, 'rejects.parquet')}), "
            f"{cut:,} passages cut to {acfg.passage_words} words"
        )
        tallies, tally, label_rows, errors = job.finalize(
            out, str(staging / "labels.parquet"), str(staging / "errors.parquet"), acfg, run, chain.gold_answers
        )
        error_rows = sum(errors.values())
        share = error_rows / annotated if annotated else 0.0
        if error_rows:
            log.info(
                f"{label}: {error_rows:,} error rows ({share:.3%} of {annotated:,} queries; by stage: "
                f"{dict(errors)}) -> {store.join(out, 'errors.parquet')}"
            )
        wall_s = time.time() - t0
        summaries = job.stage_summaries(tallies, wall_s, stats.get("engine_s"))
        for s in stages:
            log.info(f"{label} {s}: {summary_line(summaries[s])}")
        text = write_report(staging, label, tally, summaries, acfg.model)
        # The labels' identity (what training fingerprints): the chain they were cut from and the
        # settings that turn its rows into labels.
        writer.fingerprint = fingerprint(
            {
                "stages": {s: chain_fp for s in stages},
                "labels": acfg.model_dump(include={"utilrank_top_percent", "graded_threshold", "human_positive"}),
                # the QA-metric rule and the answers it scores against (absent without the stage: old labels hold)
                **(
                    {"qametric": acfg.qametric.model_dump(), "gold": chain.gold_fingerprint}
                    if QA_METRIC_STAGE in stages
                    else {}
                ),
            }
        )
        # Above the threshold the outputs are kept for inspection, but the manifest says "failed" and
        # no later stage reads them (as ingest's reject threshold).
        over = job.over_error_budget(
            label,
            error_rows,
            annotated,
            acfg.scale.max_error_fraction,
            store.join(out, "errors.parquet"),
            "annotate.scale.max_error_fraction",
        )
        status = "failed" if over else "complete"
        summary = AnnotateSummary(
            rows={"labels": label_rows, "errors": error_rows},
            errors={"rows": error_rows, "by_stage": dict(errors), "share": round(share, 6)},
            summaries=summaries,
            engines=job.replica_figures(stats),
            wall_time_s=round(time.time() - t0, 2),
        )
        writer.commit(status=status, **summary.manifest())
        if chain.stage == "annotate":  # the agreement tables; the other stages print their own
            print(text, flush=True)
        if over:
            raise AnnotateError(over)
        log.info(
            f"{label}: labels {label_rows:,} rows -> {store.join(out, 'labels.parquet')} ({time.time() - t0:.0f}s)"
        )
        return out


def check_stage_needs(acfg: AnnotateConfig) -> None:
    """Every stage asked for has its input stage asked for too (the chain runs them together)."""
    for stage in STAGE_ORDER:
        need = NEEDS.get(stage)
        if stage in acfg.chain_stages() and need and need not in acfg.chain_stages():
            raise AnnotateError(
                f"annotate.stages asks for {stage!r}, which needs the {need!r} stage's output; add "
                f"{need!r} to annotate.stages"
            )


def print_reports(cfg: PipelineConfig) -> None:
    """``utilrag annotate-report``: the agreement tables of the finished annotations, re-rendered."""
    if cfg.annotate is None or not cfg.annotate.targets:
        raise AnnotateError("the config has no annotate section with targets")
    acfg = annotate_config(cfg)
    for target in acfg.targets:
        out = target_dir(cfg, target)
        committed = store.require(out, f"annotate-report: the annotation of {target.dataset}/{target.split}")
        labels = read_table(committed.path("labels.parquet"))
        summaries = AnnotateSummary.of(committed).summaries
        rows = agreement(labels, summaries)  # printed only: the committed report files stay as written
        relsel = store.join(out, "relsel.parquet")
        by_position = agreement_by_position(labels, shown_positions(read_table(relsel))) if store.exists(relsel) else []
        label = f"{target.dataset}/{target.split}"
        print(render_markdown(label, rows, graded_kappa(labels), acfg.model, by_position), flush=True)
