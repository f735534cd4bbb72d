"""An ingested dataset as every later stage sees it: its committed tables, relevance threshold and
splits. The only way a stage opens a dataset, so that a missing, failed or interrupted ingest is
refused in one place with one line."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from utilrag.config import PipelineConfig
from utilrag.data.tables import SCHEMAS, read_rows, read_table
from utilrag.errors import UtilragError
from utilrag.store import Committed, Store, require
from utilrag.summaries import IngestSummary

ALL_QUERIES = "all"  # a split name meaning every query of the dataset, judged or not
GENERATED_TABLES = ("queries", "qrels")  # what the querygen stage's output replaces


class DatasetInputError(UtilragError):
    """A stage asked a dataset for something it does not have (a split, a run, queries)."""


class Dataset:
    """``generated``: the querygen stage's output, when it wrote questions for this dataset: its queries
    and qrels tables (the ingested ones plus the generated questions and their source passages) stand
    in for the ingested ones."""

    def __init__(self, name: str, committed: Committed, generated: Committed | None = None):
        self.name, self.committed, self.generated = name, committed, generated

    @property
    def fingerprint(self) -> str:
        if self.generated is not None:
            return f"{self.committed['input_fingerprint']}+{self.generated['input_fingerprint']}"
        return self.committed["input_fingerprint"]

    @property
    def corpus_fingerprint(self) -> str:
        """The ingest's own fingerprint: what the passages depend on (new questions leave them as they were)."""
        return self.committed["input_fingerprint"]

    def location(self, table: str) -> str:
        """Where one of the dataset's tables is (a folder of Parquet parts)."""
        if self.generated is not None and table in GENERATED_TABLES:
            return self.generated.path(table)
        return self.committed.path(table)

    @property
    def relevance_threshold(self) -> int:
        threshold = IngestSummary.of(self.committed).relevance_threshold
        if threshold is None:
            raise UtilragError(f"{self.committed.folder}: the ingest manifest records no relevance_threshold")
        return threshold

    @property
    def ignore_identical_ids(self) -> bool:
        """Evaluation drops a retrieved document whose id is the query's (BEIR: ArguAna, Quora)."""
        return IngestSummary.of(self.committed).ignore_identical_ids

    def has(self, table: str) -> bool:
        if self.generated is not None and table in GENERATED_TABLES:
            return self.generated.has(table)
        return self.committed.has(table)

    def table(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """One of the dataset's tables; empty (with its schema) when the dataset has none."""
        if not self.has(table):
            empty = SCHEMAS[table].empty_table()
            return empty.select(columns) if columns else empty
        return read_table(self.location(table), columns=columns)

    def passages(self, doc_ids: set[str]) -> dict[str, str]:
        """The text of these passages (streamed from the corpus: only they are held)."""
        if not self.has("corpus") or not doc_ids:
            return {}
        found = read_rows(self.committed.path("corpus"), "doc_id", doc_ids, ["doc_id", "text"])
        return dict(zip(found.column("doc_id").to_pylist(), found.column("text").to_pylist()))

    def _every_query(self, split: str | None, qrels: pa.Table) -> bool:
        """``all`` names every query when no qrels split has that name (a corpus of your own)."""
        return split == ALL_QUERIES and ALL_QUERIES not in set(qrels.column("split").to_pylist())

    def qrels(self, split: str | None) -> pa.Table:
        table = self.table("qrels")
        if self._every_query(split, table):
            return table  # every query: every judgment there is (none for a corpus of your own)
        return qrels_split(table, split)

    def split_queries(self, split: str | None) -> tuple[list[str], list[str]]:
        """The ids and texts of the queries judged in a qrels split; every query for None, or for
        ``all`` when no qrels split has that name (a corpus of your own has queries but no qrels)."""
        queries = self.table("queries")
        if split is not None and not self._every_query(split, self.table("qrels", ["split"])):
            wanted = pa.array(sorted(set(self.qrels(split).column("query_id").to_pylist())), pa.string())
            queries = queries.filter(pc.is_in(queries.column("query_id"), wanted))
        return queries.column("query_id").to_pylist(), queries.column("text").to_pylist()

    def run(self, name: str) -> pa.Table:
        """An ingested run by name, or one line naming the runs there are."""
        runs = self.table("runs")
        picked = runs.filter(pc.equal(runs.column("run"), name))
        if picked.num_rows == 0:
            names = sorted(set(runs.column("run").to_pylist()))
            raise DatasetInputError(f"run {name!r} is not an ingested run of {self.name!r} (runs: {names})")
        return picked

    def run_names(self) -> list[str]:
        return sorted(set(self.table("runs", columns=["run"]).column("run").to_pylist()))


def open_dataset(cfg: PipelineConfig, name: str, generated: bool = True) -> Dataset:
    """An ingested dataset, or one line: not ingested, ingest interrupted, or failed its threshold.
    With the questions the querygen stage wrote for it, when the config asks for them (``generated``:
    False for the querygen stage itself)."""
    ingested = require(Store(cfg.output_dir).ingest(name), f"dataset {name!r}")
    if generated and cfg.querygen is not None and cfg.querygen.dataset == name:
        written = require(Store(cfg.output_dir).querygen(name, "queries"), f"the generated questions of {name!r}")
        if written.get("ingest_fingerprint") not in (None, ingested["input_fingerprint"]):
            raise DatasetInputError(
                f"the generated questions of {name!r} ({written.folder}) were written from an earlier ingest of it; "
                "run the querygen stage again"
            )
        return Dataset(name, ingested, written)
    return Dataset(name, ingested)


def qrels_split(table: pa.Table, split: str | None) -> pa.Table:
    if split is None:
        return table
    known = sorted(set(table.column("split").to_pylist()))
    if split not in known:
        raise DatasetInputError(f"qrels split {split!r} not found; the dataset has {known}")
    return table.filter(pc.equal(table.column("split"), split))
