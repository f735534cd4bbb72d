"""Evaluation stage: metrics of retrieval runs against qrels, as a table, CSV, Markdown and PNG."""

from __future__ import annotations

import json
import posixpath
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from utilrag import store
from utilrag.config import BEIR_14, DATASET_GROUPS, PipelineConfig, RunToEvaluate
from utilrag.data.dataset import Dataset, open_dataset
from utilrag.data.formats import open_lines, parse_file
from utilrag.data.tables import SCHEMAS, read_table
from utilrag.errors import UtilragError
from utilrag.evaluate.metrics import DEFAULT_METRICS, MetricError, evaluate
from utilrag.evaluate.significance import format_paired_tests, paired_tests
from utilrag.plan import evaluate_runs
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import EvaluateSummary


class EvaluateError(UtilragError):
    """A run to evaluate that cannot be found."""


__all__ = ["run_evaluation", "evaluate", "read_trec_file", "format_table", "DEFAULT_METRICS", "MetricError"]


def read_trec_file(path: str, table: str) -> pa.Table:
    """A qrels (TREC 4-column or BEIR tsv) or TREC run file, streamed: the first bad line is an
    error as soon as its batch is read (nothing else of a bad file is kept)."""
    kind = _file_type(path)
    if kind == pafs.FileType.Directory:
        raise MetricError(f"{path}: is a directory, not a {'run' if table == 'runs' else 'qrels'} file")
    if kind != pafs.FileType.File:
        raise MetricError(f"{path}: file not found")
    parser = "trec_run" if table == "runs" else "trec_qrels"
    if table == "qrels":
        lines = open_lines(path)
        if next(lines, b"").lower().startswith(b"query-id"):
            parser = "beir_qrels"
        lines.close()
    stem = posixpath.splitext(posixpath.basename(path))[0]
    parts = []
    for batch in parse_file(path, table, parser, {"split": "default", "run": stem}, batch_rows=50_000):
        if batch.column("_reason").null_count < batch.num_rows:
            bad = batch.filter(pc.invert(pc.is_null(batch.column("_reason")))).slice(0, 1).to_pylist()[0]
            raise MetricError(f"{bad['_file']}:{bad['_line']}: {bad['_reason']}")
        parts.append(batch.select(SCHEMAS[table].names))
    return pa.concat_tables(parts) if parts else SCHEMAS[table].empty_table()


def _file_type(location: str) -> pafs.FileType:
    fs, path = store.filesystem(location)
    return fs.get_file_info(path).type


def load_run(cfg: PipelineConfig, dataset: Dataset, spec: RunToEvaluate) -> pa.Table:
    """A run by file path or URI, by ingested run name, a dense run's label, or "bm25s" (the BM25 stage)."""
    if _file_type(spec.run) == pafs.FileType.File:
        return read_trec_file(spec.run, "runs")
    if spec.run in dataset.run_names():
        return dataset.run(spec.run)
    layout = Store(cfg.output_dir)
    dense = layout.dense_run(spec.dataset, spec.split, spec.run)
    if store.read_manifest(dense) is not None:
        return read_table(store.require(dense, f"dense run {spec.run!r}").path("run.parquet"))
    if spec.run == "bm25s":
        folder = layout.bm25(spec.dataset, spec.split)
        return read_table(store.require(folder, f"BM25 run of {spec.dataset}/{spec.split}").path("run.parquet"))
    raise EvaluateError(
        f"run {spec.run!r}: not a file, not 'bm25s' (the BM25 stage), not a dense run at {dense}, "
        f"and not an ingested run of {spec.dataset!r} (ingested: {dataset.run_names()})"
    )


def group_means(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Per run label, the mean over a dataset group's members (CQADupStack: its 12 forums, each
    retrieved and scored on its own, as BEIR reports it). A group with members missing says so."""
    means = []
    for group, members in DATASET_GROUPS.items():
        for label in dict.fromkeys(r["label"] for r in rows if r["dataset"] in members):
            found = [r for r in rows if r["label"] == label and r["dataset"] in members]
            name = group if len(found) == len(members) else f"{group} ({len(found)} of {len(members)} forums)"
            means.append(
                {
                    "label": label,
                    "dataset": name,
                    "split": "mean",
                    "queries": sum(r["queries"] for r in found),
                    **{m: sum(r[m] for r in found) / len(found) for m in metrics},
                }
            )
    return means


BEIR_MEAN = "BEIR-14"  # the dataset name of the mean row (Table 2's "BEIR avg")


def beir_means(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Per run label scored on at least two of the paper's 14 BEIR sets, their unweighted mean (Table 2's
    "BEIR avg"), CQADupStack counted once as its forums' mean (group_means' row). Fewer than 14 sets: the
    row says how many."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        found: dict[str, dict] = {}
        for r in rows:
            if r["label"] == label and r["dataset"] in BEIR_14:  # a complete group's mean row is named as it
                found.setdefault(r["dataset"], r)
        if len(found) < 2:
            continue
        name = BEIR_MEAN if len(found) == len(BEIR_14) else f"BEIR ({len(found)} of {len(BEIR_14)} sets)"
        out.append(
            {
                "label": label,
                "dataset": name,
                "split": "mean",
                "queries": sum(r["queries"] for r in found.values()),
                **{m: sum(r[m] for r in found.values()) / len(found) for m in metrics},
            }
        )
    return out


def format_table(rows: list[dict], metrics: list[str]) -> str:
    """A Markdown table: one row per run, metrics to 4 decimals."""
    head = ["run", "dataset", "queries"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(metrics)) + "|"]
    for r in rows:
        lines.append(
            "| " + " | ".join([r["label"], r["dataset"], str(r["queries"])] + [f"{r[m]:.4f}" for m in metrics]) + " |"
        )
    return "\n".join(lines)


def reference(cfg: PipelineConfig, spec: RunToEvaluate) -> str | None:
    """The label a run is tested against: a train setting's run against the same search by the
    settings baseline (the human-label retriever), any other run against evaluate.baseline."""
    ecfg = cfg.evaluate
    if spec.setting is not None and ecfg.settings_baseline is not None:
        label = spec.label or spec.run
        return ecfg.settings_baseline + label[len(spec.setting) :]  # e.g. utilsel-rerank-bm25 -> human-rerank-bm25
    return ecfg.baseline


def significance(
    cfg: PipelineConfig, runs: list[RunToEvaluate], rows: list[dict], per_query_rows: list[dict]
) -> list[dict]:
    """Each run against its reference run (``reference``) on the same dataset: paired t-test and
    randomisation test."""
    values: dict[tuple, dict[str, float]] = {}
    for r in per_query_rows:
        values.setdefault((r["dataset"], r["label"], r["metric"]), {})[r["query_id"]] = r["value"]
    tests = []
    for spec, row in zip(runs, rows):
        base_label = reference(cfg, spec)
        if base_label is None or row["label"] == base_label:
            continue
        for metric in cfg.evaluate.metrics:
            base = values.get((row["dataset"], base_label, metric))
            if base is None:
                continue
            result = paired_tests(base, values[(row["dataset"], row["label"], metric)], cfg.evaluate.permutations)
            tests.append(
                {"dataset": row["dataset"], "label": row["label"], "metric": metric, "baseline": base_label, **result}
            )
    return tests


def format_tests(tests: list[dict]) -> str:
    """One table per reference run."""
    columns = [("run", "label"), ("dataset", "dataset"), ("metric", "metric")]
    return "\n\n".join(
        format_paired_tests([t for t in tests if t["baseline"] == base], base, columns)
        for base in dict.fromkeys(t["baseline"] for t in tests)
    )


def plot_metrics(rows: list[dict], metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    labels = [f"{r['dataset']}\n{r['label']}" for r in rows]
    for ax, m in zip(axes[0], metrics):
        values = [r[m] for r in rows]
        bars = ax.barh(range(len(rows)), values, color="#4C72B0")
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(m)
        for bar, v in zip(bars, values):
            ax.text(v + 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.3f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_evaluation(cfg: PipelineConfig, runs: list[RunToEvaluate] | None = None) -> list[dict]:
    """Evaluate each configured run; writes output_dir/evaluate/{metrics.csv,metrics.md,metrics.png,
    per_query.parquet,manifest.json} and prints the table."""
    t0 = time.time()
    runs = runs if runs is not None else evaluate_runs(cfg)  # as written, and the trained retrievers' (utilrag.plan)
    metrics = cfg.evaluate.metrics
    rows, per_query_rows = [], []
    from utilrag.evaluate.judge import judged_qrels

    scored: list[RunToEvaluate] = []  # one per row (a run scored on judged qrels too has two)
    for spec in runs:
        dataset = open_dataset(cfg, spec.dataset)
        run = load_run(cfg, dataset, spec)
        if dataset.ignore_identical_ids:  # as BEIR's evaluation: a query is not its own hit
            run = run.filter(pc.not_equal(run.column("query_id"), run.column("doc_id")))
        qrels = dataset.qrels(spec.split)
        judged = judged_qrels(cfg, spec.dataset, spec.split)
        against = (
            [] if qrels.num_rows == 0 and judged is not None else [(spec.dataset, qrels, dataset.relevance_threshold)]
        )
        if judged is not None:  # the LLM's qrels: a dataset of their own in the tables (and the tests)
            against.append((f"{spec.dataset} (LLM-judged)", *judged))
        for name, table, threshold in against:
            means, per_query = evaluate(table, run, metrics, threshold)
            label = spec.label or spec.run
            rows.append(
                {"label": label, "dataset": name, "split": spec.split or "all", "queries": len(per_query), **means}
            )
            scored.append(spec)
            for qid, values in per_query.items():
                for m, v in values.items():
                    per_query_rows.append({"label": label, "dataset": name, "query_id": qid, "metric": m, "value": v})
    tests = significance(cfg, scored, rows, per_query_rows)
    rows += group_means(rows, metrics)
    rows += beir_means(rows, metrics)
    table = format_table(rows, metrics)
    # Always recomputed (cheap); written by the commit protocol so that a report never reads half of it.
    writer = store.begin(Store(cfg.output_dir).evaluate(), "evaluate", None)
    out = writer.local_path(".")
    if tests:
        table += "\n\n" + format_tests(tests)
        pq.write_table(pa.Table.from_pylist(tests), out / "significance.parquet")
    (out / "metrics.md").write_text(table + "\n")
    (out / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    if rows:
        pacsv.write_csv(pa.Table.from_pylist(rows), out / "metrics.csv")
        pq.write_table(pa.Table.from_pylist(per_query_rows), out / "per_query.parquet")
        plot_metrics(rows, metrics, out / "metrics.png")
    summary = EvaluateSummary(
        runs=[r.model_dump(mode="json") for r in runs],
        metrics=metrics,
        baseline=cfg.evaluate.baseline,
        settings_baseline=cfg.evaluate.settings_baseline if any(r.setting for r in runs) else None,
        settings={r.label or r.run: r.setting for r in runs if r.setting},
        results=rows,
        wall_time_s=round(time.time() - t0, 2),
    )
    writer.commit(**summary.manifest())
    print(table, flush=True)
    return rows


def run(cfg: PipelineConfig) -> StageResult:
    """The evaluation stage."""
    t0 = time.time()
    rows = run_evaluation(cfg)
    return StageResult("evaluate", [Store(cfg.output_dir).evaluate()], {"runs": len(rows)}, wall_s=time.time() - t0)
