"""The BM25 stage: runs over an ingested corpus with bm25s (the retrieval itself is ``data.lexical``)."""

from __future__ import annotations

import time

from utilrag import store
from utilrag.config import BM25Config, PipelineConfig
from utilrag.data.dataset import open_dataset
from utilrag.data.lexical import bm25_search, write_trec_run
from utilrag.data.tables import fingerprint, write_table
from utilrag.logs import get_logger
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import Bm25Summary

log = get_logger("bm25")


def run_bm25(cfg: PipelineConfig, bcfg: BM25Config) -> tuple[str, bool]:
    """One BM25 run: output_dir/bm25/<dataset>-<split>/{run.parquet,run.trec}; (folder, reused)."""
    dataset = open_dataset(cfg, bcfg.dataset)
    elsewhere = bcfg.corpus not in (None, bcfg.dataset)
    passages = open_dataset(cfg, bcfg.corpus) if elsewhere and bcfg.corpus else dataset
    out = Store(cfg.output_dir).bm25(bcfg.dataset, bcfg.split)
    # the corpus's fingerprint and setting only when it is another dataset's: earlier runs stay reusable
    other = {"corpus": passages.fingerprint} if elsewhere else {}
    settings = bcfg.model_dump(exclude=set() if elsewhere else {"corpus"})
    fp = fingerprint({"input": dataset.fingerprint, **other, "config": settings})
    if store.reusable(out, fp) is not None:
        log.info(f"{bcfg.dataset}/{bcfg.split}: unchanged, reusing {out}")
        return out, True
    t0 = time.time()
    writer = store.begin(out, "bm25", fp)
    corpus = passages.table("corpus")
    qids, texts = dataset.split_queries(bcfg.split)
    run = bm25_search(corpus, qids, texts, bcfg)
    write_table(run, writer.path("run.parquet"))
    write_trec_run(run, writer.path("run.trec"))
    wall = time.time() - t0
    summary = Bm25Summary(
        config=settings,
        rows={"runs": run.num_rows, "queries": len(qids), "corpus": corpus.num_rows},
        wall_time_s=round(wall, 2),
    )
    writer.commit(**summary.manifest())
    log.info(
        f"{bcfg.dataset}/{bcfg.split}: {len(qids):,} queries over {corpus.num_rows:,} docs, "
        f"{run.num_rows:,} results in {wall:.1f}s"
    )
    return out, False


def run(cfg: PipelineConfig) -> StageResult:
    """The BM25 stage: every configured bm25 section."""
    t0 = time.time()
    done = [run_bm25(cfg, bcfg) for bcfg in cfg.bm25]
    return StageResult("bm25", [o for o, _ in done], reused=sum(r for _, r in done), wall_s=time.time() - t0)
