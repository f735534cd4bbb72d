"""What each stage records about one committed output: a typed summary per stage, declared beside the
stage in the registry (``utilrag.stages``), written into the output's manifest by the stage and read
back by the report and ``utilrag status``.

The manifest is the serialization: a summary's fields are manifest keys, so a manifest written before
a field existed still reads (the field takes its default), and the commit protocol's own keys
(``stage``, ``status``, ``input_fingerprint``, ``outputs`` …) pass by. A stage writes
``writer.commit(**SomeSummary(...).manifest())``; a reader takes ``SomeSummary.of(committed)``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

Counts = dict[str, int]
S = TypeVar("S", bound="StageSummary")


class StageSummary(BaseModel):
    model_config = ConfigDict(extra="ignore")

    wall_time_s: float | None = None
    code_version: str = "unknown"  # written by the store with every manifest, not by the stage

    @classmethod
    def of(cls: type[S], committed: Any) -> S:
        """The summary of a committed output (a ``store.Committed``, or its manifest as a dict)."""
        manifest = committed if isinstance(committed, dict) else committed.manifest
        return cls.model_validate(manifest)

    def manifest(self) -> dict:
        """The fields a stage passes to ``writer.commit``."""
        return self.model_dump(mode="json", exclude={"code_version"})

    def wall(self) -> float | None:
        """Seconds this output took to make (a reused output keeps the time of the run that made it)."""
        return self.wall_time_s


class IngestSummary(StageSummary):
    source: str | None = None
    layout: str | None = None
    relevance_threshold: int | None = None
    ignore_identical_ids: bool = False
    rows: Counts = {}  # table -> rows kept
    rejected: Counts = {}  # table -> rows rejected
    reject_reasons: dict[str, Counts] = {}
    notes: dict[str, Counts] = {}  # kept, but worth knowing (per table)
    stats: Counts = {}  # QA sets: unanswerable, title clashes …
    files: list[dict] = []  # each input file and its parser


class PoolsSummary(StageSummary):
    shuffle: dict = {}  # the seed and the generator that ordered each pool
    config: dict = {}
    rows: Counts = {}
    stats: dict = {}  # queries kept, dropped and why


class Bm25Summary(StageSummary):
    config: dict = {}
    rows: Counts = {}  # runs, queries, corpus


class AnnotateSummary(StageSummary):
    rows: Counts = {}  # labels, errors
    errors: dict = {}  # rows, by_stage, share
    summaries: dict[str, dict] = {}  # LLM stage -> its queries, tokens, rates, parse failures, wall_s
    engines: dict | list = {}  # per replica: engine starts, deaths, requests

    def wall(self) -> float | None:
        # A rerun re-commits the labels in seconds over reused stages: the stages' own time counts.
        stages = sum(float(s.get("wall_s") or 0) for s in self.summaries.values() if isinstance(s, dict))
        return max(self.wall_time_s or 0.0, stages) if (self.wall_time_s is not None or stages) else None


class QueryGenSummary(StageSummary):
    ingest_fingerprint: str | None = None  # the ingest the questions were written from (a new one: stale)
    model: str | None = None
    prompt_version: str | None = None
    config: dict = {}
    rows: Counts = {}  # queries (ingested + kept), generated, kept, gen-train, gen-test
    dropped: Counts = {}  # reason -> questions


class JudgeSummary(StageSummary):
    model: str | None = None
    annotator: str | None = None
    circular: bool = False  # the judge is the annotator
    prompt_version: str | None = None
    depth: int | None = None
    threshold: int | None = None
    runs: list[str] = []  # the runs whose top passages were pooled
    rows: Counts = {}  # queries, pairs, runs, qrels, unparsed, relevant
    agreement: dict | None = None  # against the dataset's qrels (kappa, confusion); None: it has none


class TrainSummary(StageSummary):
    config: dict = {}  # the train setting as run (train.settings entry merged over train)
    model_path: str | None = None
    phases: list[dict] = []  # name, steps, groups, positive_sampling, label_agreement (external labels)
    checkpoint: str | None = None


class IndexSummary(StageSummary):
    """One of the index stage's three outputs: a corpus encoding (``encode``), a FAISS index
    (``shards``) or a dense run (``target``, ``rows``)."""

    config: dict = {}
    encode: dict = {}  # seconds, dim, passages, precision …
    shards: list[dict] = []
    target: dict = {}
    model: str | None = None
    index_type: str | None = None
    rows: Counts = {}

    def wall(self) -> float | None:
        return self.wall_time_s if self.wall_time_s is not None else self.encode.get("seconds")


class EvaluateSummary(StageSummary):
    runs: list[dict] = []
    metrics: list[str] = []
    baseline: str | None = None
    settings_baseline: str | None = None
    settings: dict[str, str] = {}  # run label -> the train setting that made it
    results: list[dict] = []  # one row per (run, dataset): label, dataset, split, queries, metrics


class RagSummary(StageSummary):
    results: list[dict] = []  # one row per (retriever, k): recall@k, answer recall, EM, F1, ROUGE-L, BLEU
    generation: dict | None = None  # the generator's tokens, rates and wall time
    references: str = "gold"  # what the answers are scored against: gold answers, or the oracle row's (none)


class ReportSummary(StageSummary):
    sections: list[str] = []
