"""Ingest: real-format files -> Parquet tables, streamed through Ray Data.

Files are parsed in parallel by Ray Data tasks (one per file; a gzip stream cannot be split),
and the parsed batches stream back to a single validator, which owns the global checks that
need every id at once: duplicate ids, qrels and runs naming unknown queries or documents.
Every bad line is counted and written to ``rejects.parquet`` with its file, line and reason.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from utilrag import store
from utilrag.config import DatasetConfig, IngestConfig, PipelineConfig
from utilrag.data import registry
from utilrag.data.formats import parse_file
from utilrag.data.plain import fingerprint_text
from utilrag.data.qa import read_qa, resolve_qa
from utilrag.data.tables import REJECTS_SCHEMA, SCHEMAS, ParquetParts, fingerprint, heldout, write_table
from utilrag.errors import UtilragError
from utilrag.logs import get_logger
from utilrag.paths import resolve_data_root
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import IngestSummary

log = get_logger("ingest")

TABLE_ORDER = ["corpus", "queries", "qrels", "runs", "pools"]  # references point backwards


class IngestError(UtilragError):
    """Too many bad rows, or an input that cannot be read (printed as one message, exit 2)."""


@dataclass
class TableReport:
    rows: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # kept-but-noteworthy rows (e.g. qrels outside corpus)


@dataclass
class IngestResult:
    dataset: str
    output: str
    reused: bool
    tables: dict[str, TableReport]
    relevance_threshold: int

    @property
    def rejected(self) -> int:
        return sum(t.rejected for t in self.tables.values())


# --------------------------------------------------------------------------- Ray Data side
def parse_file_batch(batch: dict):
    """Ray Data map_batches fn: a batch of file jobs (JSON) -> Arrow batches of parsed rows."""
    for job_json in batch["job"]:
        job = json.loads(str(job_json))
        yield from parse_file(job["uri"], job["table"], job["parser"], job["ctx"], job["batch_rows"])


def stream_parsed(jobs: list[registry.FileJob], batch_rows: int):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # first occurrence wins, deterministically
    items = [{"job": json.dumps({**asdict(j), "batch_rows": batch_rows})} for j in jobs]
    # one task per file, up to 1,000 tasks (a folder of 100,000 Markdown files: ~100 files a task)
    ds: Any = ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
    ds = ds.map_batches(parse_file_batch, batch_size=1, batch_format="numpy")
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


# --------------------------------------------------------------------------- validation
DROPPED = "dropped: "  # a reason whose row is dropped as a duplicate, not rejected as bad


class Validator:
    """Global checks over one table's stream; remembers ids later tables refer to."""

    def __init__(self, unknown_qrels_docs: str, drop_duplicate_text: bool = False, check_docs: bool = True):
        self.unknown_qrels_docs = unknown_qrels_docs
        self.check_docs = check_docs  # false without a corpus (queries_only): the passages are another dataset's
        # plain layout: a passage whose words (case, punctuation, spacing aside) an earlier one has is
        # dropped, counted, and kept in the rejects file without counting against the threshold
        self.texts: dict[bytes, str] | None = {} if drop_duplicate_text else None
        self.doc_ids: dict[str, int] = {}
        self.query_ids: dict[str, int] = {}
        self.seen_keys: set = set()

    def check(self, table: str, batch: pa.Table, report: TableReport) -> tuple[pa.Table, list[dict]]:
        reasons = batch.column("_reason").to_pylist()
        rejects: list[dict] = []
        keep = [False] * batch.num_rows
        cols = {name: batch.column(name).to_pylist() for name in SCHEMAS[table].names}
        files, lines, raws = (batch.column(c).to_pylist() for c in ("_file", "_line", "_raw"))
        for i, reason in enumerate(reasons):
            if reason is None:
                reason = self._row_reason(table, {k: v[i] for k, v in cols.items()}, report)
            if reason is None:
                keep[i] = True
                continue
            if reason == "":  # an identical duplicate (Tevatron repeats passages across pools)
                report.notes["identical duplicate merged"] += 1
                continue
            if reason.startswith(DROPPED):
                report.notes["duplicate text dropped"] += 1
                rejects.append(
                    dict(table=table, file=files[i], line=lines[i], reason=reason[len(DROPPED) :], raw=raws[i] or "")
                )
                continue
            report.rejected += 1
            report.reasons[reason.split(" (")[0] if reason.startswith("duplicate") else _category(reason)] += 1
            raw = raws[i] or ""
            rejects.append(dict(table=table, file=files[i], line=lines[i], reason=reason, raw=raw))
        good = batch.filter(pa.array(keep, pa.bool_())).select(SCHEMAS[table].names)
        report.rows += good.num_rows
        return good, rejects

    def _row_reason(self, table: str, row: dict, report: TableReport) -> str | None:
        if table == "corpus":
            reason = self._unique(self.doc_ids, row["doc_id"], hash((row["title"], row["text"])), "doc id")
            if reason is None and self.texts is not None:
                words = fingerprint_text(row["text"])
                first = row["doc_id"] if words is None else self.texts.setdefault(words, row["doc_id"])
                if first != row["doc_id"]:
                    del self.doc_ids[row["doc_id"]]  # dropped: its id stays free
                    return f"{DROPPED}duplicate text of {first}"
            return reason
        if table == "queries":
            return self._unique(self.query_ids, row["query_id"], hash(row["text"]), "query id")
        if row["query_id"] not in self.query_ids:
            return f"unknown query id {row['query_id']}"
        if self.check_docs and row["doc_id"] not in self.doc_ids:
            if table == "qrels" and self.unknown_qrels_docs == "keep":
                report.notes["judged doc outside the corpus (kept)"] += 1
            else:
                return f"unknown doc id {row['doc_id']}"
        key = (table, row.get("split") or row.get("run"), row["query_id"], row["doc_id"])
        if key in self.seen_keys:
            return f"duplicate {table} row for query {row['query_id']} doc {row['doc_id']}"
        self.seen_keys.add(key)
        return None

    @staticmethod
    def _unique(seen: dict, key: str, content: int, what: str) -> str | None:
        if key not in seen:
            seen[key] = content
            return None
        return "" if seen[key] == content else f"duplicate {what} {key} (different content)"


LOST_DATA = ("truncated", "read error")  # categories meaning the rest of a file could not be read


def _category(reason: str) -> str:
    for prefix in ("unknown query id", "unknown doc id", "invalid UTF-8", "expected", "malformed JSON", *LOST_DATA):
        if reason.startswith(prefix):
            return prefix
    return reason


# --------------------------------------------------------------------------- driver
def _input_fingerprint(resolved: registry.ResolvedDataset, icfg: IngestConfig) -> str:
    stats = []
    for job in resolved.jobs:
        fs, path = store.filesystem(job.uri)
        info = fs.get_file_info(path)
        stats.append((job.uri, job.table, job.parser, info.size, str(info.mtime)))
    return fingerprint(
        {
            "files": stats,
            "threshold": resolved.relevance_threshold,
            "unknown_qrels_docs": resolved.unknown_qrels_docs,
            # only where it applies: the fingerprints of every other dataset stay as they were
            **({"ignore_identical_ids": True} if resolved.ignore_identical_ids else {}),
            **({"titles": False} if not resolved.titles else {}),
            # plain layout: how documents are cut into passages (a new rule re-ingests)
            **(
                {"plain": {k: v for k, v in resolved.jobs[0].ctx.items() if k != "root"}}
                if resolved.layout == "plain"
                else {}
            ),
            "reject_threshold": icfg.reject_threshold,
        }
    )


def _reused(name: str, out: str, fp: str, old: store.Committed, threshold: int) -> IngestResult:
    tables = {t: TableReport(rows=n, rejected=old["rejected"].get(t, 0)) for t, n in old["rows"].items()}
    log.info(f"{name}: inputs unchanged (fingerprint {fp}), reusing {out}")
    return IngestResult(name, out, True, tables, threshold)


def ingest_dataset(resolved: registry.ResolvedDataset, out: str, icfg: IngestConfig) -> IngestResult:
    fp = _input_fingerprint(resolved, icfg)
    old = store.reusable(out, fp)
    if old is not None:
        return _reused(resolved.name, out, fp, old, resolved.relevance_threshold)

    started = time.time()
    writer = store.begin(out, "ingest", fp, dataset=resolved.name)
    validator = Validator(
        resolved.unknown_qrels_docs,
        drop_duplicate_text=resolved.layout == "plain",
        check_docs=any(j.table == "corpus" for j in resolved.jobs),
    )
    reports: dict[str, TableReport] = {}
    all_rejects: list[dict] = []
    for table in TABLE_ORDER:
        jobs = [j for j in resolved.jobs if j.table == table]
        if not jobs:
            continue
        t0 = time.time()
        report = reports[table] = TableReport()
        parts = ParquetParts(writer.path(table), SCHEMAS[table], icfg.rows_per_file)
        for batch in stream_parsed(jobs, icfg.batch_rows):
            if table == "corpus" and not resolved.titles:  # text alone, as the evaluation corpus has it
                batch = batch.set_column(
                    batch.schema.get_field_index("title"), "title", pa.array([""] * batch.num_rows, pa.string())
                )
            good, rejects = validator.check(table, batch, report)
            parts.write(good)
            all_rejects.extend(rejects)
        parts.close()
        log.info(
            f"{resolved.name}/{table}: {report.rows:,} rows kept, {report.rejected:,} rejected "
            f"from {len(jobs)} file(s) in {time.time() - t0:.1f}s"
        )

    write_table(pa.Table.from_pylist(all_rejects, schema=REJECTS_SCHEMA), writer.path("rejects.parquet"))
    total = sum(r.rows + r.rejected for r in reports.values())
    rejected = sum(r.rejected for r in reports.values())
    share = rejected / total if total else 0.0
    # Above the threshold the tables are kept for inspection, but the manifest says "failed" and no
    # later stage reads them.
    status = "complete" if share <= icfg.reject_threshold else "failed"
    summary = IngestSummary(
        source=resolved.root,
        layout=resolved.layout,
        relevance_threshold=resolved.relevance_threshold,
        ignore_identical_ids=resolved.ignore_identical_ids,
        rows={t: r.rows for t, r in reports.items()},
        rejected={t: r.rejected for t, r in reports.items()},
        notes={t: dict(r.notes) for t, r in reports.items() if r.notes},
        reject_reasons={t: dict(r.reasons) for t, r in reports.items() if r.reasons},
        files=[asdict(j) for j in resolved.jobs],
        wall_time_s=round(time.time() - started, 2),
    )
    writer.commit(status=status, **summary.manifest())
    print_summary(resolved.name, reports)
    if status != "complete":
        raise IngestError(
            f"{resolved.name}: {rejected:,} of {total:,} rows rejected ({share:.3%}) exceeds "
            f"reject_threshold {icfg.reject_threshold:.3%}; see {store.join(out, 'rejects.parquet')}"
        )
    return IngestResult(resolved.name, out, False, reports, resolved.relevance_threshold)


QA_SPLIT = "dev"  # the qrels split of a QA set's gold passages
QA_TRAIN_SPLIT, QA_TEST_SPLIT = "train", "test"  # ... and, with qa_test_percent, by gold passage


def ingest_qa(ds: DatasetConfig, data_root: str, out: str, icfg: IngestConfig) -> IngestResult:
    """A question-answering file (SQuAD, NQ-open, DPR, HotpotQA, MS MARCO QnA) as an ingested dataset:
    its corpus (when it has passages), queries, qrels (the gold passages, split "dev") and qa table
    (answers), with rejects — so BM25, the index and evaluation run on it like on any other dataset."""
    path = resolve_qa(ds.path or ds.name, data_root, allow_download=icfg.download)
    fp = fingerprint(
        {
            "file": path,
            "stamp": store.file_stamp(path),
            "layout": "qa",
            "reject_threshold": icfg.reject_threshold,
            **({"test_percent": ds.qa_test_percent} if ds.qa_test_percent else {}),  # unset: old ingests hold
        }
    )
    old = store.reusable(out, fp)
    if old is not None:
        return _reused(ds.name, out, fp, old, 1)
    t0 = time.time()
    writer = store.begin(out, "ingest", fp, dataset=ds.name)
    data = read_qa(path)
    qa = data.qa.cast(SCHEMAS["qa"])
    gold = [
        (q, d, QA_SPLIT)
        for q, docs in zip(qa.column("query_id").to_pylist(), qa.column("gold_doc_ids").to_pylist())
        for d in docs or []
    ]
    # A question's split follows its gold passage (the smallest id when it has several, as HotpotQA's two):
    # with one gold passage per question (SQuAD, MS MARCO QnA) no passage is on both sides.
    if ds.qa_test_percent:
        columns = (qa.column(c).to_pylist() for c in ["query_id", "gold_doc_ids"])
        first = {q: min(docs) for q, docs in zip(*columns) if docs}
        gold += [
            (q, d, QA_TEST_SPLIT if heldout(first[q], ds.qa_test_percent, 0) else QA_TRAIN_SPLIT)
            for q, d, _ in list(gold)
        ]
    tables = {
        "corpus": data.corpus,
        "queries": pa.table({"query_id": qa.column("query_id"), "text": qa.column("question")}),
        "qrels": pa.table(
            {
                "query_id": [q for q, _, _ in gold],
                "doc_id": [d for _, d, _ in gold],
                "grade": pa.array([1] * len(gold), pa.int32()),
                "split": [s for _, _, s in gold],
            }
        ),
        "qa": qa,
    }
    reports: dict[str, TableReport] = {}
    for name, table in tables.items():
        if name == "corpus" and table.num_rows == 0:
            continue  # answers only (NQ-open): closed-book, or retrieval over a corpus supplied elsewhere
        parts = ParquetParts(writer.path(name), SCHEMAS[name], icfg.rows_per_file)
        parts.write(table)
        parts.close()
        reports[name] = TableReport(rows=table.num_rows)
    reports["qa"].rejected = len(data.rejects)
    for r in data.rejects:
        reports["qa"].reasons[_category(r["reason"])] += 1
    rejects = [{"table": "qa", **{k: r[k] for k in ("file", "line", "reason", "raw")}} for r in data.rejects]
    write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), writer.path("rejects.parquet"))
    total = qa.num_rows + len(rejects)
    share = len(rejects) / total if total else 0.0
    status = "complete" if share <= icfg.reject_threshold else "failed"
    summary = IngestSummary(
        source=path,
        layout="qa",
        relevance_threshold=1,
        rows={t: r.rows for t, r in reports.items()},
        rejected={t: r.rejected for t, r in reports.items()},
        reject_reasons={t: dict(r.reasons) for t, r in reports.items() if r.reasons},
        stats=data.stats,
        wall_time_s=round(time.time() - t0, 2),
    )
    writer.commit(status=status, **summary.manifest())
    for name, report in reports.items():
        log.info(f"{ds.name}/{name}: {report.rows:,} rows kept, {report.rejected:,} rejected")
    print_summary(ds.name, reports)
    if status != "complete":
        raise IngestError(
            f"{ds.name}: {len(rejects):,} of {total:,} questions rejected ({share:.3%}) exceeds "
            f"reject_threshold {icfg.reject_threshold:.3%}; see {store.join(out, 'rejects.parquet')}"
        )
    return IngestResult(ds.name, out, False, reports, 1)


def print_summary(name: str, reports: dict[str, TableReport]) -> None:
    for table, r in reports.items():
        # Lost data (a truncated or unreadable file) is always shown; other reasons, the 4 commonest.
        lost = [f"{n:,} {why}" for why, n in r.reasons.items() if why in LOST_DATA]
        common = [f"{n:,} {why}" for why, n in r.reasons.most_common() if why not in LOST_DATA][:4]
        extras = lost + common + [f"{n:,} {why}" for why, n in r.notes.items()]
        if extras:
            log.info(f"{name}/{table}: " + "; ".join(extras))


def ingest(cfg: PipelineConfig, names: list[str] | None = None) -> dict[str, IngestResult]:
    """Every configured dataset (or those named) -> output_dir/ingest/<name>/."""
    data_root = resolve_data_root(cfg.data_root)
    results = {}
    for ds in cfg.ingest.datasets:
        if names and ds.name not in names:
            continue
        out = Store(cfg.output_dir).ingest(ds.name)
        if ds.layout == "qa" or (ds.layout == "auto" and registry.kind(ds.name) == "qa"):
            results[ds.name] = ingest_qa(ds, data_root, out, cfg.ingest)
            continue
        resolved = registry.resolve(ds, data_root, allow_download=cfg.ingest.download)
        results[ds.name] = ingest_dataset(resolved, out, cfg.ingest)
    return results


def run(cfg: PipelineConfig) -> StageResult:
    """The ingest stage."""
    from utilrag.raycluster import connect

    t0 = time.time()
    connect(cfg.ray)
    results = ingest(cfg)
    return StageResult(
        "ingest",
        outputs=[str(r.output) for r in results.values()],
        counts={f"{name}/{t}": rep.rows for name, r in results.items() for t, rep in r.tables.items()},
        reused=sum(r.reused for r in results.values()),
        wall_s=time.time() - t0,
    )
