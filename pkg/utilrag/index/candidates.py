"""The candidates stage: the off-the-shelf encoder searches that pools read (pools.dense), run before the
pools exist. The same searches as the index stage's (same folders, same fingerprints): the index stage
then finds them done."""

from __future__ import annotations

import time

from utilrag.config import IndexTarget, PipelineConfig
from utilrag.stages import StageResult


def candidate_targets(cfg: PipelineConfig) -> list[IndexTarget]:
    """The index.targets entries some pools section names as its dense candidates."""
    wanted = {(p.dataset, p.dense) for p in cfg.pools if p.dense}
    return [t for t in cfg.index.targets if (t.dataset, t.run_label()) in wanted]


def run(cfg: PipelineConfig) -> StageResult:
    from utilrag.index import run_index
    from utilrag.raycluster import connect

    t0 = time.time()
    connect(cfg.ray)
    written = run_index(cfg, candidate_targets(cfg))
    return StageResult(
        "candidates", [o for o, _ in written], reused=sum(r for _, r in written), wall_s=time.time() - t0
    )
