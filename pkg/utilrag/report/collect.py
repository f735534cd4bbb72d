"""The report's first half: a run directory's committed outputs read into numbers.

Every stage folder with a manifest is found (``discover``), each committed one read through its
stage's typed summary (``utilrag.summaries``, declared in the stage registry) and the files it lists
(annotation's report.json, the loss log, the paired tests, PNGs). ``collect`` returns one ``Collected``:
the numbers of every section (what report.json holds) and the images; ``utilrag.report`` renders it.
Nothing here formats text.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from utilrag import store
from utilrag.config import PipelineConfig
from utilrag.cost import Rates, gpu_hours
from utilrag.errors import UtilragError
from utilrag.stages import STAGES, get_stage
from utilrag.store import Committed, Store
from utilrag.summaries import (
    AnnotateSummary,
    EvaluateSummary,
    JudgeSummary,
    RagSummary,
    StageSummary,
    TrainSummary,
)

PAPER_ANNOTATOR = "Qwen2.5-32B"
LARGE_ANNOTATOR = 7e9  # parameters: below this the labels are not the paper's kind of labels
P_LEVEL = 0.05
# Where each stage's committed folders are: (stage, top folder, depth of the committed folders below it).
LAYOUT = (
    ("ingest", "ingest", 1),
    ("pools", "pools", 1),
    ("bm25", "bm25", 1),
    ("querygen", "querygen", 2),  # querygen/<dataset>/{pool,questions,queries}
    ("annotate", "annotate", 1),
    ("train", "train", 1),
    ("index", "index", 3),  # index/<dataset>/<model>/{embeddings,faiss-...}
    ("index", "dense", 2),  # dense/<dataset>-<split>/<label>
    ("judge", "judge", 2),  # judge/<dataset>-<split>/{pool,grades,qrels}
    ("evaluate", "evaluate", 0),
    ("rag", "rag", 2),  # rag/<dataset>/report (generate/ keeps per-stage .meta manifests only)
)
STAGE_ORDER = [s.name for s in STAGES if s.name != "report"]  # the cost table's rows
TOKEN_KEYS = (
    "queries",
    "prompt_tokens",
    "output_tokens",
    "prompt_tokens_per_query",
    "tokens_per_s",
    "generate_s",
    "wall_s",
    "parse_failure_rate",
)


@dataclass
class Found:
    """One stage folder with a manifest: committed, or not complete (and why)."""

    stage: str
    rel: str  # relative to the run directory, e.g. annotate/scifact-train
    committed: Committed | None
    why: str = ""
    summary: StageSummary = field(default_factory=StageSummary)  # its stage's, read once by discover


@dataclass
class Picture:
    """A PNG an output holds, to show in a section."""

    alt: str
    name: str  # its file name beside report.md
    data: bytes


@dataclass
class Collected:
    """Everything the report shows: each section's numbers (report.json) and its pictures."""

    root: str
    sections: dict[str, dict]  # header, retrieval, annotation, training, rag, cost
    pictures: dict[str, Picture] = field(default_factory=dict)  # by the folder (and name) they belong to


# --------------------------------------------------------------------------- reading
def _is_dir(location: str) -> bool:
    fs, path = store.filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def at(root: str, rel: str) -> str:
    return store.join(root, *rel.split("/"))


def discover(root: str) -> list[Found]:
    """Every stage folder of the run directory that has a manifest, in pipeline order."""
    found = []
    for stage, top, depth in LAYOUT:
        rels = [top]
        for _ in range(depth):
            rels = [
                f"{rel}/{name}"
                for rel in rels
                if _is_dir(at(root, rel))
                for name in store.list_names(at(root, rel))
                if not name.startswith(".") and name != store.MANIFEST and not re.fullmatch(r"v-[0-9a-f]{12}", name)
            ]
        for rel in rels:
            location = at(root, rel)
            if store.read_manifest(location) is None:
                continue
            try:
                committed = store.require(location, rel)
                found.append(Found(stage, rel, committed, summary=get_stage(stage).summary.of(committed)))
            except UtilragError as e:
                found.append(Found(stage, rel, None, str(e)))
            except ValidationError as e:  # hand-edited, or written by other code: shown as not readable
                why = f"{rel}: manifest not readable as a {stage} summary ({e.errors()[0]['loc']})"
                found.append(Found(stage, rel, None, why))
    return found


def _read_bytes(location: str) -> bytes | None:
    fs, path = store.filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def _picture(pictures: dict[str, Picture], key: str, c: Committed, name: str, alt: str) -> None:
    data = _read_bytes(c.path(name)) if c.has(name) else None
    if data:
        pictures[key] = Picture(alt, store.slug(key) + ".png", data)


def _committed(found: list[Found], stage: str) -> list[tuple[str, Committed, StageSummary]]:
    return [(f.rel, f.committed, f.summary) for f in found if f.stage == stage and f.committed is not None]


# --------------------------------------------------------------------------- annotator size
def parameters(model: str) -> float | None:
    """The parameter count written in a model's name (SmolLM2-135M -> 1.35e8, Qwen2.5-32B -> 3.2e10), else None."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    sizes = [
        float(n) * (1e6 if unit.lower() == "m" else 1e9)
        for n, unit in re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([mMbB])(?![a-zA-Z])", name)
    ]
    return max(sizes) if sizes else None


def size(params: float) -> str:
    return f"{params / 1e9:g}B" if params >= 1e9 else f"{params / 1e6:g}M"


def annotator_warning(model: str) -> str | None:
    """A plain warning when the annotator is not a large model; None for one of 7B parameters or more."""
    params = parameters(model)
    tiny = any(word in model.lower() for word in ("smollm", "tiny"))
    tail = f"they exercise the pipeline, they do not reproduce the paper ({PAPER_ANNOTATOR})"
    if params is not None and (params < 1e9 or tiny):
        return f"labels from a {size(params)}-parameter annotator ({model}) are near random; {tail}."
    if tiny:
        return f"labels from a tiny annotator ({model}) are near random; {tail}."
    if params is None:
        return (
            f"the annotator's parameter count is unknown ({model}); unless it is a large model its labels may be "
            f"near random: {tail}."
        )
    if params < LARGE_ANNOTATOR:
        return f"labels from a {size(params)}-parameter annotator ({model}) are far weaker than the paper's; {tail}."
    return None


# --------------------------------------------------------------------------- sections
def header(cfg: PipelineConfig, root: str, found: list[Found], now: str) -> dict:
    versions: dict[str, list[str]] = {}
    for f in found:
        if f.committed is not None:
            versions.setdefault(f.summary.code_version, []).append(f.rel)
    return {
        "run_dir": root,
        "generated_at": now,
        "code_version": store.code_version(),
        "output_code_versions": versions,
        "notes": cfg.report.notes,
        "incomplete": [{"folder": f.rel, "why": f.why} for f in found if f.committed is None],
        "config": cfg.model_dump(mode="json"),
    }


def retrieval(cfg: PipelineConfig, found: list[Found], pictures: dict[str, Picture]) -> dict:
    """Every evaluated run with its paired tests: the baselines' (runs not made by a train setting) and
    the label settings' (one retriever per train setting, tested against the reference setting's)."""
    done = _committed(found, "evaluate")
    if not done:
        return {"ran": False}
    _, c, s = done[0]
    assert isinstance(s, EvaluateSummary)
    rows = s.results
    metrics = s.metrics or [k for k in (rows[0] if rows else {}) if k not in ("label", "dataset", "split", "queries")]
    baseline = s.baseline if "baseline" in c.manifest else cfg.evaluate.baseline  # what evaluate tested against
    tests: dict[tuple, dict] = {}
    if c.has("significance.parquet"):
        fs, path = store.filesystem(c.path("significance.parquet"))  # one file (core code: no data.tables)
        for t in pq.read_table(path, filesystem=fs).to_pylist():
            tests[(t["dataset"], t["label"], t["metric"])] = t
    out_rows: list[dict] = []
    for r in rows:
        marks, tested = {}, {}
        for m in metrics:
            t = tests.get((r["dataset"], r["label"], m))
            marks[m] = bool(t and max(t["t_p"], t["rand_p"]) < P_LEVEL)
            if t:
                tested[m] = t
        setting = s.settings.get(r["label"])
        reference = next(iter(tested.values()), {}).get("baseline", baseline)
        is_reference = r["label"] in (baseline, s.settings_baseline) or (
            setting is not None and setting == s.settings_baseline
        )
        out_rows.append(
            {
                **r,
                "setting": setting,
                "reference": reference,
                "is_reference": is_reference and not tested,
                "significant": marks,
                "tests": tested,
            }
        )
    _picture(pictures, "evaluate-metrics", c, "metrics.png", "retrieval metrics per run")
    judged = [
        {
            "folder": rel,
            **js.model_dump(include={"model", "circular", "depth", "threshold", "runs", "rows", "agreement"}),
        }
        for rel, _, js in _committed(found, "judge")
        if isinstance(js, JudgeSummary) and rel.endswith("/qrels")
    ]
    return {
        "ran": True,
        "judged": judged,
        "folder": "evaluate",
        "baseline": baseline,
        "settings_baseline": s.settings_baseline,
        "metrics": metrics,
        "p_level": P_LEVEL,
        "baselines_tested": bool(baseline) and any(not s.settings.get(t["label"]) for t in tests.values()),
        "rows": out_rows,
    }


def annotation(found: list[Found]) -> dict:
    done = _committed(found, "annotate")
    if not done:
        return {"ran": False, "targets": []}
    targets = []
    for rel, c, summary in done:
        assert isinstance(summary, AnnotateSummary)
        report = (store.read_json(c.path("report.json")) if c.has("report.json") else None) or {}
        model = str(report.get("model") or "unknown")
        targets.append(
            {
                "folder": rel,
                "model": model,
                "parameters": parameters(model),
                "warning": annotator_warning(model),
                "agreement": report.get("agreement") or [],
                "agreement_by_shown_position": report.get("agreement_by_shown_position") or [],
                "graded_kappa": report.get("graded_kappa"),
                "stages": report.get("stages") or summary.summaries,
            }
        )
    return {"ran": True, "targets": targets}


def _losses(c: Committed) -> list[float]:
    text = store.read_text(c.path("metrics.csv")) if c.has("metrics.csv") else None
    if not text:
        return []
    by_step: dict[str, float] = {}
    for row in csv.DictReader(io.StringIO(text)):
        try:
            by_step[row.get("global_step", str(len(by_step)))] = float(row["loss"])
        except (KeyError, TypeError, ValueError):
            continue
    return list(by_step.values())


def training(found: list[Found], pictures: dict[str, Picture]) -> dict:
    done = _committed(found, "train")
    if not done:
        return {"ran": False, "runs": []}
    runs: list[dict] = []
    for rel, c, s in done:
        assert isinstance(s, TrainSummary)
        losses = _losses(c)
        tail = losses[-min(10, len(losses)) :] if losses else []
        name = rel.split("/", 1)[1]
        _picture(pictures, f"train-{name}-loss", c, "loss.png", f"loss curve of {name}")
        runs.append(
            {
                "folder": rel,
                "name": name,
                "labels": s.config.get("labels"),
                "config": s.config,
                "phases": s.phases,
                "steps": sum(int(p.get("steps", 0)) for p in s.phases),
                "logged_steps": len(losses),
                "first_loss": losses[0] if losses else None,
                "final_loss_mean10": sum(tail) / len(tail) if tail else None,
                "wall_time_s": s.wall(),
            }
        )
    return {"ran": True, "runs": runs}


def rag(found: list[Found], pictures: dict[str, Picture]) -> dict:
    done = [d for d in _committed(found, "rag") if d[0].endswith("/report")]
    if not done:
        return {"ran": False, "datasets": []}
    datasets = []
    for rel, c, s in done:
        assert isinstance(s, RagSummary)
        dataset = rel.split("/")[1]
        _picture(pictures, f"rag-{dataset}-f1", c, "f1.png", f"RAG F1 and EM of {dataset}")
        datasets.append(
            {
                "folder": rel,
                "dataset": dataset,
                "results": s.results,
                "generation": s.generation,
                "references": s.references,
            }
        )
    return {"ran": True, "datasets": datasets}


def tokens_per_query(stages: dict[str, dict]) -> dict[str, float]:
    """Prompt, prefix-cached and output tokens per query over every LLM stage (each stage's tokens over
    its own queries)."""
    out = {"prompt": 0.0, "cached": 0.0, "output": 0.0}
    for s in stages.values():
        if s.get("queries"):
            prompt = s.get("prompt_tokens", 0)
            out["prompt"] += prompt / s["queries"]
            out["cached"] += prompt * (s.get("prefix_cache_hit_rate") or 0.0) / s["queries"]
            out["output"] += s.get("output_tokens", 0) / s["queries"]
    return out


def cost(cfg: PipelineConfig, found: list[Found], annotated: dict, rag_data: dict) -> dict:
    """Wall time per stage, the LLM stages' tokens and the GPU-hours at MS MARCO scale (assumed rate)."""
    rcfg = cfg.report
    walls: dict[str, dict] = {}
    for f in found:
        if f.committed is not None:
            entry = walls.setdefault(f.stage, {"outputs": 0, "wall_time_s": 0.0, "missing": 0})
            entry["outputs"] += 1
            wall = f.summary.wall()
            if wall is None:
                entry["missing"] += 1
            else:
                entry["wall_time_s"] += float(wall)
    tokens = []
    sources = [(t["folder"], t["stages"]) for t in annotated.get("targets", [])]
    sources += [(d["folder"], {"rag": d["generation"]}) for d in rag_data.get("datasets", []) if d.get("generation")]
    for f in found:  # the chains of query generation and judging: their tokens count too
        if f.committed is not None and f.rel.endswith(("/questions", "/grades")):
            sources.append((f.rel, AnnotateSummary.of(f.committed).summaries))
    for folder, stages in sources:
        for name, s in stages.items():
            tokens.append({"folder": folder, "stage": name, **{k: s.get(k) for k in TOKEN_KEYS}})
    rates = Rates(rcfg.prefill_tokens_per_s, rcfg.vllm_efficiency, rcfg.decode_tokens_per_s)
    estimates = []
    for t in annotated.get("targets", []):
        per_query = tokens_per_query(t["stages"])
        if not per_query["prompt"]:
            continue
        generated = [s for s in t["stages"].values() if s.get("tokens_per_s") and s.get("generate_s")]
        measured = None
        if generated and len(generated) == len(t["stages"]):
            total_tokens = sum(s.get("prompt_tokens", 0) + s.get("output_tokens", 0) for s in generated)
            measured = total_tokens / sum(s["generate_s"] for s in generated)
        total = per_query["prompt"] + per_query["output"]
        estimates.append(
            {
                "folder": t["folder"],
                "model": t["model"],
                "tokens_per_query": total,
                "prompt_tokens_per_query": per_query["prompt"],
                "cached_tokens_per_query": per_query["cached"],
                "output_tokens_per_query": per_query["output"],
                "queries": rcfg.scale_queries,
                "gpu_hours": gpu_hours(
                    rcfg.scale_queries, per_query["prompt"], per_query["cached"], per_query["output"], rates
                ),
                "measured_tokens_per_s": measured,
                "hours_at_measured_rate": rcfg.scale_queries * total / measured / 3600 if measured else None,
            }
        )
    return {
        "wall_time_s": {s: walls[s]["wall_time_s"] for s in STAGE_ORDER if s in walls},
        "outputs": {s: walls[s]["outputs"] for s in STAGE_ORDER if s in walls},
        "without_time": {s: walls[s]["missing"] for s in STAGE_ORDER if walls.get(s, {}).get("missing")},
        "total_wall_time_s": sum(w["wall_time_s"] for w in walls.values()),
        "tokens": tokens,
        "gpu_hours": estimates,
        "assumption": {
            **rates.as_dict(),
            "prefill_measured_on": rcfg.throughput_of,
            "measured": ["prefill_tokens_per_s"],
            "assumed": ["vllm_efficiency", "decode_tokens_per_s"],
        },
    }


def collect(cfg: PipelineConfig) -> Collected:
    """Every section's numbers for the run directory of ``cfg``."""
    root = Store(cfg.output_dir).root
    found = discover(root)
    pictures: dict[str, Picture] = {}
    annotated = annotation(found)
    rag_data = rag(found, pictures)
    sections = {
        "header": header(cfg, root, found, time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        "retrieval": retrieval(cfg, found, pictures),
        "annotation": annotated,
        "training": training(found, pictures),
        "rag": rag_data,
        "cost": cost(cfg, found, annotated, rag_data),
    }
    return Collected(root, sections, pictures)
