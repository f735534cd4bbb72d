"""The report stage: a run directory's committed outputs as one document for a person to open.

Reads every earlier stage's committed outputs through the store (manifests, report.json, tables,
PNGs; local paths or URIs) and writes ``output_dir/report/`` by the commit protocol:
``report.md`` (with the PNGs beside it), ``report.html`` (the same, self-contained: PNGs as data URIs,
inline CSS, nothing loaded from the network) and ``report.json`` (the numbers). Sections: header
(run directory, code versions, the exact config, date), retrieval (with paired-test marks against
``evaluate.baseline``), annotation agreement (the paper's Table 1 form, with a plain warning when the
annotator is small), training, RAG, and cost (wall time per stage, LLM tokens, and a GPU-hour
estimate for MS MARCO scale at an *assumed* throughput, ``report.gpu_tokens_per_s``). A section whose
stage has no committed output says so in one line. Always recomputed: it is cheap.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from utilrag import store
from utilrag.config import PipelineConfig
from utilrag.errors import UtilragError
from utilrag.report import paper
from utilrag.report.render import Block, Code, Heading, Image, Para, Table, to_html, to_markdown
from utilrag.stages import StageResult
from utilrag.store import Committed, Store

PAPER_ANNOTATOR = "Qwen2.5-32B"
LARGE_ANNOTATOR = 7e9  # parameters: below this the labels are not the paper's kind of labels
P_LEVEL = 0.05
MARK = "†"
LLM_SOURCES = ["relsel", "utilsel", "utilrank", "graded"]  # the stages that label (answer only feeds utilsel)
# Where each stage's committed folders are: (stage, top folder, depth of the committed folders below it).
LAYOUT = (
    ("ingest", "ingest", 1),
    ("pools", "pools", 1),
    ("bm25", "bm25", 1),
    ("annotate", "annotate", 1),
    ("train", "train", 1),
    ("index", "index", 3),  # index/<dataset>/<model>/{embeddings,faiss-...}
    ("index", "dense", 2),  # dense/<dataset>-<split>/<label>
    ("evaluate", "evaluate", 0),
    ("rag", "rag", 2),  # rag/<dataset>/report (generate/ keeps per-stage .meta manifests only)
)
STAGE_ORDER = ["ingest", "pools", "bm25", "annotate", "train", "index", "evaluate", "rag"]


@dataclass
class Found:
    """One stage folder with a manifest: committed, or not complete (and why)."""

    stage: str
    rel: str  # relative to the run directory, e.g. annotate/scifact-train
    committed: Committed | None
    why: str = ""


# --------------------------------------------------------------------------- reading
def _is_dir(location: str) -> bool:
    fs, path = store.filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _at(root: str, rel: str) -> str:
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
                if _is_dir(_at(root, rel))
                for name in store.list_names(_at(root, rel))
                if not name.startswith(".") and name != store.MANIFEST and not re.fullmatch(r"v-[0-9a-f]{12}", name)
            ]
        for rel in rels:
            location = _at(root, rel)
            if store.read_manifest(location) is None:
                continue
            try:
                found.append(Found(stage, rel, store.require(location, rel)))
            except UtilragError as e:
                found.append(Found(stage, rel, None, str(e)))
    return found


def _read_bytes(location: str) -> bytes | None:
    fs, path = store.filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def _image(c: Committed, name: str, alt: str, as_name: str) -> Image | None:
    data = _read_bytes(c.path(name)) if c.has(name) else None
    return Image(alt, store.slug(as_name) + ".png", data) if data else None


def _committed(found: list[Found], stage: str) -> list[tuple[str, Committed]]:
    return [(f.rel, f.committed) for f in found if f.stage == stage and f.committed is not None]


def _not_run(root: str, what: str, rel: str) -> Para:
    return Para(f"Not run: no committed {what} under {_at(root, rel)}.", "muted")


# --------------------------------------------------------------------------- formatting
def _num(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _int(x) -> str:
    return "–" if x is None else f"{int(x):,}"


def _duration(s) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _wall(c: Committed) -> float | None:
    wall = c.get("wall_time_s")
    if wall is None and isinstance(c.get("encode"), dict):  # corpus embeddings record their encode time
        wall = c.get("encode", {}).get("seconds")
    summaries = c.get("summaries")
    if isinstance(summaries, dict):  # annotation: a rerun re-commits its labels in seconds over reused stages
        stages = sum(float(s.get("wall_s") or 0) for s in summaries.values() if isinstance(s, dict))
        wall = max(wall or 0.0, stages)
    return wall


# --------------------------------------------------------------------------- annotator size
def parameters(model: str) -> float | None:
    """The parameter count written in a model's name (SmolLM2-135M -> 1.35e8, Qwen2.5-32B -> 3.2e10), else None."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    sizes = [
        float(n) * (1e6 if unit.lower() == "m" else 1e9)
        for n, unit in re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([mMbB])(?![a-zA-Z])", name)
    ]
    return max(sizes) if sizes else None


def _size(params: float) -> str:
    return f"{params / 1e9:g}B" if params >= 1e9 else f"{params / 1e6:g}M"


def annotator_warning(model: str) -> str | None:
    """A plain warning when the annotator is not a large model; None for one of 7B parameters or more."""
    params = parameters(model)
    tiny = any(word in model.lower() for word in ("smollm", "tiny"))
    tail = f"they exercise the pipeline, they do not reproduce the paper ({PAPER_ANNOTATOR})"
    if params is not None and (params < 1e9 or tiny):
        return f"labels from a {_size(params)}-parameter annotator ({model}) are near random; {tail}."
    if tiny:
        return f"labels from a tiny annotator ({model}) are near random; {tail}."
    if params is None:
        return (
            f"the annotator's parameter count is unknown ({model}); unless it is a large model its labels may be "
            f"near random: {tail}."
        )
    if params < LARGE_ANNOTATOR:
        return f"labels from a {_size(params)}-parameter annotator ({model}) are far weaker than the paper's; {tail}."
    return None


# --------------------------------------------------------------------------- sections
def header(cfg: PipelineConfig, root: str, found: list[Found], now: str) -> tuple[list[Block], dict]:
    version = store.code_version()
    versions: dict[str, list[str]] = {}
    for f in found:
        if f.committed is not None:
            versions.setdefault(str(f.committed.get("code_version", "unknown")), []).append(f.rel)
    config = cfg.model_dump(mode="json")
    blocks: list[Block] = [
        Heading("utilrag report", 1),
        Table(
            ["", ""],
            [
                ["run directory", root],
                ["generated", now],
                ["code version (report)", version],
                *[
                    [f"code version {v}", f"{len(rels)} output(s): " + _listing(rels)]
                    for v, rels in sorted(versions.items())
                ],
            ],
        ),
    ]
    if len(versions) > 1 or (versions and version not in versions):
        blocks.append(
            Para(
                f"the committed outputs were written by {len(versions)} code version(s) "
                f"({', '.join(sorted(versions))}), and this report by {version}: compare with care.",
                "warn",
            )
        )
    for note in cfg.report.notes:
        blocks.append(Para(note, "warn"))
    incomplete = [f for f in found if f.committed is None]
    for f in incomplete:
        blocks.append(Para(f"left out, not complete: {f.why}", "warn"))
    blocks.append(
        Code("The exact config (cfg.model_dump(), defaults included)", yaml.safe_dump(config, sort_keys=False), "yaml")
    )
    data = {
        "run_dir": root,
        "generated_at": now,
        "code_version": version,
        "output_code_versions": versions,
        "notes": cfg.report.notes,
        "incomplete": [{"folder": f.rel, "why": f.why} for f in incomplete],
        "config": config,
    }
    return blocks, data


def _listing(items: list[str], most: int = 8) -> str:
    return ", ".join(items[:most]) + (f", … (+{len(items) - most} more)" if len(items) > most else "")


def retrieval(cfg: PipelineConfig, root: str, found: list[Found]) -> tuple[list[Block], dict, str]:
    """Every run not made by a train setting (the baselines) first, then the label-settings table (one
    retriever per train setting, marked against the human-label one: the paper's comparison)."""
    blocks: list[Block] = [Heading("Retrieval")]
    done = _committed(found, "evaluate")
    if not done:
        blocks.append(_not_run(root, "evaluation", "evaluate"))
        return blocks, {"ran": False}, ""
    _, c = done[0]
    rows = c.get("results") or []
    metrics = c.get("metrics") or [
        k for k in (rows[0] if rows else {}) if k not in ("label", "dataset", "split", "queries")
    ]
    baseline = c.get("baseline", cfg.evaluate.baseline)  # what evaluate tested against, when it says
    settings: dict[str, str] = c.get("settings") or {}  # run label -> the train setting that made it
    settings_baseline = c.get("settings_baseline")
    tests: dict[tuple, dict] = {}
    if c.has("significance.parquet"):
        fs, path = store.filesystem(c.path("significance.parquet"))  # one file (core code: no data.tables)
        for t in pq.read_table(path, filesystem=fs).to_pylist():
            tests[(t["dataset"], t["label"], t["metric"])] = t
    out_rows: list[dict] = []
    trained_cells: list[list[str]] = []
    other_cells: list[list[str]] = []
    for r in rows:
        marks, tested = {}, {}
        for m in metrics:
            t = tests.get((r["dataset"], r["label"], m))
            marks[m] = bool(t and max(t["t_p"], t["rand_p"]) < P_LEVEL)
            if t:
                tested[m] = t
        setting = settings.get(r["label"])
        reference = next(iter(tested.values()), {}).get("baseline", baseline)
        is_reference = r["label"] in (baseline, settings_baseline) or (
            setting is not None and setting == settings_baseline
        )
        cells = [
            r["label"] + (" (baseline)" if is_reference and not tested else ""),
            r["dataset"],
            str(r.get("split", "")),
            _int(r.get("queries")),
        ]
        cells += [_num(r.get(m)) + (f" {MARK}" if marks[m] else "") for m in metrics]
        (trained_cells if setting else other_cells).append(cells)
        out_rows.append({**r, "setting": setting, "reference": reference, "significant": marks, "tests": tested})
    head = ["run", "dataset", "split", "queries", *metrics]
    right = {3, *range(4, 4 + len(metrics))}
    headline = ""
    settings_blocks: list[Block] = []
    if trained_cells:
        table = Table(head, trained_cells, right)
        headline = to_markdown([table]).strip()
        settings_blocks = [
            Heading("Retrievers by label setting", 3),
            Para(
                "One retriever per train setting (train.settings), each searching the same evaluation sets; "
                "metrics to 4 decimals."
            ),
            table,
            Para(
                f"{MARK} p < {P_LEVEL} against the {settings_baseline!r} setting's run of the same search, in both "
                "the paired t-test and the paired randomisation test (evaluate/significance.parquet).",
                "muted",
            ),
        ]
    if other_cells:
        table = Table(head, other_cells, right)
        headline = headline or to_markdown([table]).strip()
        blocks += [
            Heading("Baselines" if trained_cells else "Every evaluated run", 3),
            Para(f"Runs from {_at(root, 'evaluate')} not made by a train setting; metrics to 4 decimals."),
            table,
        ]
        if baseline and any(not settings.get(t["label"]) for t in tests.values()):
            blocks.append(
                Para(
                    f"{MARK} p < {P_LEVEL} against the baseline run {baseline!r} on the same dataset and metric, in "
                    "both the paired t-test and the paired randomisation test (evaluate/significance.parquet).",
                    "muted",
                )
            )
        elif baseline:
            blocks.append(Para(f"No paired tests of these runs against the baseline {baseline!r}.", "muted"))
        else:
            blocks.append(Para("No paired tests: evaluate.baseline is not set.", "muted"))
    blocks += settings_blocks
    image = _image(c, "metrics.png", "retrieval metrics per run", "evaluate-metrics")
    if image:
        blocks.append(image)
    data = {
        "ran": True,
        "baseline": baseline,
        "settings_baseline": settings_baseline,
        "metrics": metrics,
        "p_level": P_LEVEL,
        "rows": out_rows,
    }
    return blocks, data, headline


def annotation(root: str, found: list[Found]) -> tuple[list[Block], dict]:
    blocks: list[Block] = [Heading("Annotation agreement")]
    done = _committed(found, "annotate")
    if not done:
        blocks.append(_not_run(root, "annotation", "annotate"))
        return blocks, {"ran": False, "targets": []}
    targets = []
    for rel, c in done:
        report = (store.read_json(c.path("report.json")) if c.has("report.json") else None) or {}
        model = str(report.get("model") or "unknown")
        warning = annotator_warning(model)
        params = parameters(model)
        blocks.append(Heading(f"{rel} — annotator {model}", 3))
        blocks.append(
            Para(
                f"Annotator {model} ({_size(params) + ' parameters' if params else 'parameter count unknown'}); "
                f"LLM labels against the human positives of the same pools (micro precision and recall over the "
                f"queries each stage labelled), as the paper's Table 1."
            )
        )
        if warning:
            blocks.append(Para(warning, "warn"))
        rows = report.get("agreement") or []
        if rows:
            blocks.append(
                Table(
                    ["stage", "queries", "precision", "recall", "positives/query", "no positive", "parse failures"],
                    [
                        [
                            r["source"],
                            _int(r.get("queries")),
                            _pct(r.get("precision")),
                            _pct(r.get("recall")),
                            _num(r.get("positives_per_query"), 2),
                            _int(r.get("queries_without_positive")),
                            _pct(r.get("parse_failure_rate")),
                        ]
                        for r in rows
                    ],
                    {1, 2, 3, 4, 5, 6},
                )
            )
        else:
            blocks.append(Para("No agreement rows (no LLM labelling stage ran, or report.json is missing).", "muted"))
        by_position = report.get("agreement_by_shown_position") or []
        if by_position:
            buckets = list(dict.fromkeys(r["shown_at"] for r in by_position))
            cells = {(r["source"], r["shown_at"]): r for r in by_position}
            sources = list(dict.fromkeys(r["source"] for r in by_position))
            blocks.append(
                Para(
                    "Recall of the human positives by the position they were shown at (pools shuffled per query; "
                    "in brackets: human positives shown there). An annotator that favours the first passages "
                    "recalls more at position 1."
                )
            )
            blocks.append(
                Table(
                    ["stage", *[f"shown at {b}" for b in buckets]],
                    [
                        [s]
                        + [
                            f"{_pct(cells[(s, b)]['recall'])} ({cells[(s, b)]['human_positives']:,})"
                            if (s, b) in cells
                            else "–"
                            for b in buckets
                        ]
                        for s in sources
                    ],
                    set(range(1, len(buckets) + 1)),
                )
            )
        kappa = report.get("graded_kappa")
        if kappa:
            blocks.append(
                Para(
                    f"Graded judge against the qrels grades: Cohen's kappa {kappa.get('kappa')}, linear-weighted "
                    f"{kappa.get('kappa_linear')}, exact agreement {_pct(kappa.get('exact_agreement'))} over "
                    f"{_int(kappa.get('pairs'))} judged pool passages."
                )
            )
        targets.append(
            {
                "folder": rel,
                "model": model,
                "parameters": params,
                "warning": warning,
                "agreement": rows,
                "agreement_by_shown_position": by_position,
                "graded_kappa": kappa,
                "stages": report.get("stages") or c.get("summaries") or {},
            }
        )
    return blocks, {"ran": True, "targets": targets}


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


def training(root: str, found: list[Found]) -> tuple[list[Block], dict]:
    blocks: list[Block] = [Heading("Training")]
    done = _committed(found, "train")
    if not done:
        blocks.append(_not_run(root, "training run", "train"))
        return blocks, {"ran": False, "runs": []}
    runs: list[dict] = []
    rows: list[list[str]] = []
    images: list[Block] = []
    for rel, c in done:
        tcfg = c.get("config") or {}
        labels = str(tcfg.get("labels", "?"))
        if tcfg.get("labels_path"):
            labels += f" ({tcfg['labels_path']})"
        if tcfg.get("human_mix_percent"):
            labels += f", {tcfg['human_mix_percent']:g}% human mixed in"
        if tcfg.get("curriculum_human_percent"):
            labels += f", then curriculum on {tcfg['curriculum_human_percent']:g}% human"
        phases = c.get("phases") or []
        steps = sum(int(p.get("steps", 0)) for p in phases)
        losses = _losses(c)
        tail = losses[-min(10, len(losses)) :] if losses else []
        final = sum(tail) / len(tail) if tail else None
        name = rel.split("/", 1)[1]
        rows.append(
            [
                name,
                str(tcfg.get("model", "?")),
                f"{tcfg.get('dataset', '?')}/{tcfg.get('split', '?')}",
                labels,
                str(tcfg.get("loss", "?")),
                "; ".join(
                    f"{p.get('name')}: {_int(p.get('steps'))} steps, {_int(p.get('groups'))} groups, "
                    f"positives {p.get('positive_sampling')}"
                    for p in phases
                )
                or "–",
                _int(steps),
                _num(losses[0] if losses else None, 3),
                _num(final, 3),
                _duration(_wall(c)),
            ]
        )
        image = _image(c, "loss.png", f"loss curve of {name}", f"train-{name}-loss")
        if image:
            images += [Heading(f"Loss: {name}", 3), image]
        runs.append(
            {
                "folder": rel,
                "name": name,
                "labels": tcfg.get("labels"),
                "config": tcfg,
                "phases": phases,
                "steps": steps,
                "logged_steps": len(losses),
                "first_loss": losses[0] if losses else None,
                "final_loss_mean10": final,
                "wall_time_s": _wall(c),
            }
        )
    blocks.append(
        Table(
            [
                "run",
                "base model",
                "data",
                "label source",
                "loss",
                "phases",
                "steps",
                "first loss",
                "final loss",
                "wall time",
            ],
            rows,
            {6, 7, 8, 9},
        )
    )
    blocks.append(Para("final loss: the mean of the last 10 logged steps (rank 0's batches).", "muted"))
    external = [(r["name"], p["label_agreement"]) for r in runs for p in r["phases"][:1] if p.get("label_agreement")]
    if external:
        blocks += [
            Heading("External labels against the human positives", 3),
            Para(
                "Labels made elsewhere (train.labels: external), compared as the annotation agreement table compares "
                "ours: micro precision and recall of their positives against the human positives, over the pooled "
                "queries both label."
            ),
            Table(
                ["run", "queries", "precision", "recall", "positives/query", "positives outside the pool",
                 "labelled queries not pooled"],
                [[name, _int(a.get("queries")), _pct(a.get("precision")), _pct(a.get("recall")),
                  _num(a.get("positives_per_query"), 2), _int(a.get("positives_outside_the_pool")),
                  _int(a.get("labelled_queries_outside_the_pools"))] for name, a in external],
                {1, 2, 3, 4, 5, 6},
            ),
        ]  # fmt: skip
    return blocks + images, {"ran": True, "runs": runs}


def rag(root: str, found: list[Found]) -> tuple[list[Block], dict]:
    blocks: list[Block] = [Heading("RAG")]
    done = [(rel, c) for rel, c in _committed(found, "rag") if rel.endswith("/report")]
    if not done:
        blocks.append(_not_run(root, "RAG evaluation", "rag"))
        return blocks, {"ran": False, "datasets": []}
    datasets = []
    for rel, c in done:
        dataset = rel.split("/")[1]
        results = c.get("results") or []
        blocks.append(Heading(f"{dataset}", 3))
        blocks.append(Para("Scores in percent; k: passages given to the generator (0: closed book)."))
        blocks.append(
            Table(
                ["retriever", "k", "recall@k", "answer recall@k", "EM", "F1", "ROUGE-L", "BLEU-3", "BLEU-4", "n"],
                [
                    [str(r.get("retriever")), str(r.get("k"))]
                    + [
                        _num(r.get(key), 1)
                        for key in ("recall@k", "answer_recall@k", "exact_match", "f1", "rouge_l", "bleu_3", "bleu_4")
                    ]
                    + [_int(r.get("n"))]
                    for r in results
                ],
                set(range(1, 10)),
            )
        )
        image = _image(c, "f1.png", f"RAG F1 and EM of {dataset}", f"rag-{dataset}-f1")
        if image:
            blocks.append(image)
        datasets.append({"folder": rel, "dataset": dataset, "results": results, "generation": c.get("generation")})
    return blocks, {"ran": True, "datasets": datasets}


def tokens_per_query(stages: dict[str, dict]) -> float:
    """Prompt + output tokens per query over every LLM stage (each stage's tokens over its own queries)."""
    return sum(
        (s.get("prompt_tokens", 0) + s.get("output_tokens", 0)) / s["queries"]
        for s in stages.values()
        if s.get("queries")
    )


def gpu_hours(queries: int, per_query: float, tokens_per_s: float) -> float:
    return queries * per_query / tokens_per_s / 3600


def cost(cfg: PipelineConfig, found: list[Found], annotated: dict, rag_data: dict) -> tuple[list[Block], dict]:
    rcfg = cfg.report
    blocks: list[Block] = [Heading("Cost")]
    walls: dict[str, dict] = {}
    for f in found:
        if f.committed is not None:
            entry = walls.setdefault(f.stage, {"outputs": 0, "wall_time_s": 0.0, "missing": 0})
            entry["outputs"] += 1
            wall = _wall(f.committed)
            if wall is None:
                entry["missing"] += 1
            else:
                entry["wall_time_s"] += float(wall)
    rows = []
    for stage in STAGE_ORDER:
        w = walls.get(stage)
        if w is None:
            rows.append([stage, "0", "not run"])
        else:
            note = f" ({w['missing']} without a recorded time)" if w["missing"] else ""
            rows.append([stage, str(w["outputs"]), _duration(w["wall_time_s"]) + note])
    total = sum(w["wall_time_s"] for w in walls.values())
    rows.append(["total", str(sum(w["outputs"] for w in walls.values())), _duration(total)])
    blocks += [
        Para(
            "Wall time per stage, summed over its committed outputs (a reused output keeps the time of the "
            "run that made it)."
        ),
        Table(["stage", "outputs", "wall time"], rows, {1, 2}),
    ]
    token_rows, token_data = [], []
    sources = [(t["folder"], t["stages"]) for t in annotated.get("targets", [])]
    sources += [(d["folder"], {"answer": d["generation"]}) for d in rag_data.get("datasets", []) if d.get("generation")]
    for folder, stages in sources:
        for name, s in stages.items():
            q = s.get("queries") or 0
            token_rows.append(
                [
                    folder,
                    name,
                    _int(q),
                    _int(s.get("prompt_tokens")),
                    _int(s.get("output_tokens")),
                    _num(s.get("prompt_tokens_per_query"), 1),
                    _num((s.get("output_tokens") or 0) / q if q else None, 1),
                    _num(s.get("tokens_per_s"), 1),
                    _pct(s.get("parse_failure_rate")),
                    _duration(s.get("wall_s")),
                ]
            )
            token_data.append({"folder": folder, "stage": name, **{k: s.get(k) for k in TOKEN_KEYS}})
    if token_rows:
        blocks += [
            Heading("LLM tokens", 3),
            Para(
                "tokens/s: prompt + output tokens over the generation time of all replicas (– when resumed or reused)."
            ),
            Table(
                [
                    "output",
                    "LLM stage",
                    "queries",
                    "prompt tokens",
                    "output tokens",
                    "prompt tokens/query",
                    "output tokens/query",
                    "tokens/s",
                    "parse failures",
                    "wall time",
                ],
                token_rows,
                set(range(2, 10)),
            ),
        ]
    estimates = []
    for t in annotated.get("targets", []):
        per_query = tokens_per_query(t["stages"])
        if not per_query:
            continue
        hours = gpu_hours(rcfg.scale_queries, per_query, rcfg.gpu_tokens_per_s)
        generated = [s for s in t["stages"].values() if s.get("tokens_per_s") and s.get("generate_s")]
        measured = None
        if generated and len(generated) == len(t["stages"]):
            tokens = sum(s.get("prompt_tokens", 0) + s.get("output_tokens", 0) for s in generated)
            measured = tokens / sum(s["generate_s"] for s in generated)
        estimates.append(
            {
                "folder": t["folder"],
                "model": t["model"],
                "tokens_per_query": per_query,
                "queries": rcfg.scale_queries,
                "assumed_tokens_per_s": rcfg.gpu_tokens_per_s,
                "gpu_hours": hours,
                "measured_tokens_per_s": measured,
                "hours_at_measured_rate": gpu_hours(rcfg.scale_queries, per_query, measured) if measured else None,
            }
        )
    blocks.append(Heading(f"GPU-hours at MS MARCO scale ({rcfg.scale_queries:,} queries)", 3))
    if estimates:
        blocks.append(
            Para(
                f"Assumed, not measured: {rcfg.gpu_tokens_per_s:,g} tokens/s is a placeholder throughput for "
                f"{rcfg.throughput_of}. Replace report.gpu_tokens_per_s with a measured rate before quoting "
                "these hours. The tokens per query are measured in this run (with this run's annotator and prompts).",
                "warn",
            )
        )
        blocks.append(
            Table(
                ["annotation", "annotator", "tokens/query (measured)", "queries", "tokens/s (assumed)", "GPU-hours"],
                [
                    [
                        e["folder"],
                        e["model"],
                        _num(e["tokens_per_query"], 1),
                        _int(e["queries"]),
                        f"{e['assumed_tokens_per_s']:,g}",
                        _num(e["gpu_hours"], 1),
                    ]
                    for e in estimates
                ],
                {2, 3, 4, 5},
            )
        )
        blocks.append(Para("GPU-hours = queries × (prompt + output) tokens per query ÷ tokens/s ÷ 3600.", "muted"))
        for e in estimates:
            if e["measured_tokens_per_s"]:
                blocks.append(
                    Para(
                        f"For comparison, {e['folder']} measured {e['measured_tokens_per_s']:,.1f} tokens/s "
                        f"({e['model']}, all replicas of this run): {e['hours_at_measured_rate']:,.1f} hours "
                        "at that rate.",
                        "muted",
                    )
                )
    else:
        blocks.append(Para("No estimate: no annotation with token counts.", "muted"))
    data = {
        "wall_time_s": {s: walls[s]["wall_time_s"] for s in STAGE_ORDER if s in walls},
        "outputs": {s: walls[s]["outputs"] for s in STAGE_ORDER if s in walls},
        "total_wall_time_s": total,
        "tokens": token_data,
        "gpu_hours": estimates,
        "assumption": {
            "gpu_tokens_per_s": rcfg.gpu_tokens_per_s,
            "throughput_of": rcfg.throughput_of,
            "measured": False,
        },
    }
    return blocks, data


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


# --------------------------------------------------------------------------- the stage
def build(cfg: PipelineConfig) -> tuple[list[Block], dict, str]:
    """The report's blocks, its numbers (report.json) and the headline retrieval table (Markdown)."""
    root = Store(cfg.output_dir).root
    found = discover(root)
    now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    head, head_data = header(cfg, root, found, now)
    ret, ret_data, headline = retrieval(cfg, root, found)
    ann, ann_data = annotation(root, found)
    tra, tra_data = training(root, found)
    rg, rag_data = rag(root, found)
    pap, paper_data = paper.section(cfg, ret_data, ann_data, rag_data)
    cst, cost_data = cost(cfg, found, ann_data, rag_data)
    data = {
        **head_data,
        "retrieval": ret_data,
        "annotation": ann_data,
        "training": tra_data,
        "rag": rag_data,
        "paper": paper_data,
        "cost": cost_data,
    }
    return head + ret + ann + tra + rg + pap + cst, data, headline


def run(cfg: PipelineConfig) -> StageResult:
    """The report stage: output_dir/report/{report.md, report.html, report.json, *.png}."""
    t0 = time.time()
    blocks, data, headline = build(cfg)
    writer = store.begin(Store(cfg.output_dir).report(), "report", None)
    for b in blocks:
        if isinstance(b, Image):
            writer.local_path(b.name).write_bytes(b.data)
    writer.local_path("report.md").write_text(to_markdown(blocks), encoding="utf-8")
    writer.local_path("report.html").write_text(to_html(blocks, f"utilrag report: {data['run_dir']}"), encoding="utf-8")
    writer.local_path("report.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    sections = [k for k in ("retrieval", "annotation", "training", "rag") if data[k].get("ran")]
    committed = writer.commit(sections=sections, wall_time_s=round(time.time() - t0, 2))
    print(headline or "no retrieval evaluation in this run directory", flush=True)
    print(f"report: {committed.path('report.html')}", flush=True)
    return StageResult("report", [committed.folder], {"sections": len(sections)}, wall_s=time.time() - t0)
