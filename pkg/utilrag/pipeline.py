"""The pipeline: the registry's stages in order, each reusing its outputs when its fingerprint matches."""

from __future__ import annotations

import time

from utilrag.config import PipelineConfig
from utilrag.errors import UtilragError
from utilrag.logs import get_logger
from utilrag.plan import annotate_stages, evaluate_runs, index_targets
from utilrag.stages import STAGES, StageResult, get_stage

log = get_logger("pipeline")


def configured(cfg: PipelineConfig, name: str) -> bool:
    """Whether the config asks for a stage: ingest always; the others when their section has work."""
    if name == "ingest":
        return True
    if name == "candidates":
        return any(p.dense for p in cfg.pools)
    if name in ("pools", "bm25"):
        return bool(getattr(cfg, name))
    if name == "annotate":
        return cfg.annotate is not None and bool(cfg.annotate.targets) and bool(annotate_stages(cfg))
    if name == "querygen":
        return cfg.querygen is not None
    if name == "judge":
        return cfg.judge is not None and bool(cfg.judge.targets)
    if name == "train":
        return "train" in cfg.model_fields_set  # the section has defaults: only when written
    if name == "index":
        return bool(index_targets(cfg))
    if name == "evaluate":
        return bool(evaluate_runs(cfg))
    if name == "rag":
        return cfg.rag is not None
    if name == "report":  # the last stage: whenever any stage beyond ingest is asked for
        return any(configured(cfg, s.name) for s in STAGES if s.name not in ("ingest", "report"))
    return False


def select_stages(
    cfg: PipelineConfig, only: list[str] | None = None, start: str | None = None, among: tuple[str, ...] | None = None
) -> list[str]:
    names = [s.name for s in STAGES if among is None or s.name in among]
    for name in [*(only or []), *([start] if start else [])]:
        get_stage(name)  # one line for an unknown name
    if only:
        return [n for n in names if n in only]
    if start:
        if start not in names:
            raise UtilragError(f"--from {start}: not a stage of this job ({', '.join(names)})")
        names = names[names.index(start) :]
    return [n for n in names if configured(cfg, n)]


def run_pipeline(
    cfg: PipelineConfig, only: list[str] | None = None, start: str | None = None, among: tuple[str, ...] | None = None
) -> list[StageResult]:
    from utilrag.raycluster import connect

    t0 = time.time()
    names = select_stages(cfg, only, start, among)  # a mistyped name fails before Ray starts
    connect(cfg.ray)
    log.info(f"stages: {' -> '.join(names)}")
    results = []
    for name in names:
        result = get_stage(name).runner()(cfg)
        log.info(f"{name}: {result.line()}")
        results.append(result)
    log.info(f"done in {time.time() - t0:.1f}s; outputs under {cfg.output_dir}")
    return results
