"""The main job: ingest -> pools -> BM25 -> dense index -> evaluation, each stage reusing unchanged outputs."""

from __future__ import annotations

import time

from utilrag.config import PipelineConfig
from utilrag.data import ingest, run_pools
from utilrag.evaluate import run_evaluation
from utilrag.index import run_bm25, run_index
from utilrag.raycluster import connect


def run_pipeline(cfg: PipelineConfig) -> list[dict]:
    t0 = time.time()
    connect(cfg.ray)
    ingest(cfg)
    for pcfg in cfg.pools:
        run_pools(cfg, pcfg)
    for bcfg in cfg.bm25:
        run_bm25(cfg, bcfg)
    if cfg.index.targets:
        run_index(cfg)
    rows = run_evaluation(cfg)
    print(f"[run] done in {time.time() - t0:.1f}s; outputs under {cfg.output_dir}", flush=True)
    return rows
