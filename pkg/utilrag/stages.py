"""The stage registry: the CLI, the pipeline and the job entrypoint all come from this list.

Each stage is a module with one ``run(cfg) -> StageResult``; it declares what it reads and writes
(folders under the run directory, see ``utilrag.store``). Modules are imported only when a stage
runs, so ``utilrag --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from utilrag.errors import UtilragError
from utilrag.summaries import (
    AnnotateSummary,
    Bm25Summary,
    EvaluateSummary,
    IndexSummary,
    IngestSummary,
    JudgeSummary,
    PoolsSummary,
    QueryGenSummary,
    RagSummary,
    ReportSummary,
    StageSummary,
    TrainSummary,
)


@dataclass
class StageResult:
    stage: str
    outputs: list[str] = field(default_factory=list)  # folders (paths or URIs) written or reused
    counts: dict[str, int] = field(default_factory=dict)  # rows, queries, steps … per output
    reused: int = 0  # outputs reused because their fingerprint matched
    wall_s: float = 0.0

    def line(self) -> str:
        reused = f", {self.reused} reused" if self.reused else ""
        return f"{len(self.outputs)} output(s){reused} in {self.wall_s:.1f}s"


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    module: str  # holds run(cfg) -> StageResult
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    summary: type[StageSummary]  # what its manifests record (utilrag.summaries): written by it, read by the report

    def runner(self) -> Callable:
        run = importlib.import_module(self.module).run

        def run_stage(cfg):
            from utilrag import lease

            try:
                return run(cfg)
            finally:  # a stage that failed after its begin leaves no lease held by this process
                lease.release_all()

        return run_stage


# Pipeline order. A stage reads only what stages before it write.
STAGES: tuple[Stage, ...] = (
    Stage(
        "ingest",
        "ingest the configured datasets (real formats) into Parquet, with rejects",
        "utilrag.data.ingest",
        reads=("data_root",),
        writes=("ingest/<dataset>",),
        summary=IngestSummary,
    ),
    Stage(
        "querygen",
        "questions written by an LLM for sampled passages of a corpus that has none (train and held-out)",
        "utilrag.annotate.querygen",
        reads=("ingest/<dataset>",),
        writes=("querygen/<dataset>",),
        summary=QueryGenSummary,
    ),
    Stage(
        "candidates",
        "an off-the-shelf encoder's search of the pooled queries (pools.dense), before the pools",
        "utilrag.index.candidates",
        reads=("ingest/<dataset>", "querygen/<dataset>"),
        writes=("index/<dataset>/<model>", "dense/<dataset>-<split>/<label>"),
        summary=IndexSummary,
    ),
    Stage(
        "pools",
        "build the candidate pools (31 passages per training query) for annotation",
        "utilrag.data.pools",
        reads=("ingest/<dataset>",),
        writes=("pools/<dataset>-<split>",),
        summary=PoolsSummary,
    ),
    Stage(
        "bm25",
        "BM25 runs with bm25s",
        "utilrag.index.bm25",
        reads=("ingest/<dataset>",),
        writes=("bm25/<dataset>-<split>",),
        summary=Bm25Summary,
    ),
    Stage(
        "annotate",
        "LLM utility annotation (RelSel, pseudo-answer, UtilSel, UtilRank, graded) with vLLM",
        "utilrag.annotate",
        reads=("ingest/<dataset>", "pools/<dataset>-<split>"),
        writes=("annotate/<dataset>-<split>",),
        summary=AnnotateSummary,
    ),
    Stage(
        "train",
        "fit the bi-encoder with Ray Train + DeepSpeed (human or LLM labels, curriculum)",
        "utilrag.train.recipe",
        reads=("ingest/<dataset>", "pools/<dataset>-<split>", "annotate/<dataset>-<split>"),
        writes=("train/<name>",),
        summary=TrainSummary,
    ),
    Stage(
        "index",
        "encode a corpus, build sharded FAISS indices on Ray actors, write dense runs",
        "utilrag.index",
        reads=("ingest/<dataset>", "train/<name>"),
        writes=("index/<dataset>/<model>", "dense/<dataset>-<split>/<label>"),
        summary=IndexSummary,
    ),
    Stage(
        "judge",
        "LLM-judged qrels: the evaluated runs' top passages graded 0-3, agreement with the qrels",
        "utilrag.evaluate.judge",
        reads=("ingest/<dataset>", "bm25/<dataset>-<split>", "dense/<dataset>-<split>/<label>"),
        writes=("judge/<dataset>-<split>",),
        summary=JudgeSummary,
    ),
    Stage(
        "evaluate",
        "evaluate the configured runs (metrics table, plot, paired tests)",
        "utilrag.evaluate",
        reads=("ingest/<dataset>", "bm25/<dataset>-<split>", "dense/<dataset>-<split>/<label>"),
        writes=("evaluate",),
        summary=EvaluateSummary,
    ),
    Stage(
        "rag",
        "RAG evaluation: top-k passages of each run, vLLM generation, EM/F1 and recall@k",
        "utilrag.rag",
        reads=("ingest/<qa dataset>", "bm25/<dataset>-<split>", "dense/<dataset>-<split>/<label>"),
        writes=("rag/<dataset>/generate", "rag/<dataset>/report"),
        summary=RagSummary,
    ),
    Stage(
        "report",
        "the run directory's outputs as one report (report.md, self-contained report.html, report.json)",
        "utilrag.report",
        reads=(
            "ingest/<dataset>",
            "pools/<dataset>-<split>",
            "bm25/<dataset>-<split>",
            "annotate/<dataset>-<split>",
            "train/<name>",
            "index/<dataset>/<model>",
            "dense/<dataset>-<split>/<label>",
            "evaluate",
            "rag/<dataset>/report",
        ),
        writes=("report",),
        summary=ReportSummary,
    ),
)

BY_NAME = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise UtilragError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}")
    return BY_NAME[name]
