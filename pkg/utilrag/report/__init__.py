"""The report stage: a run directory's committed outputs as one document for a person to open.

Two halves: ``report.collect`` reads every earlier stage's committed outputs through the store (each
through its stage's typed summary; local paths or URIs) into numbers; this module renders them and
writes ``output_dir/report/`` by the commit protocol: ``report.md`` (with the PNGs beside it),
``report.html`` (the same, self-contained: PNGs as data URIs, inline CSS, nothing loaded from the
network) and ``report.json`` (the numbers). Sections: header (run directory, code versions, the exact
config, date), retrieval (with paired-test marks against ``evaluate.baseline``), annotation agreement
(the paper's Table 1 form, with a plain warning when the annotator is small), training, RAG, the paper
beside ours, and cost (wall time per stage, LLM tokens, and a GPU-hour estimate for MS MARCO scale at
the measured prefill rate and assumed factors of ``utilrag.cost``). A section whose stage has no committed output
says so in one line. Always recomputed: it is cheap.
"""

from __future__ import annotations

import json
import time

import yaml

from utilrag import store
from utilrag.config import PipelineConfig
from utilrag.report import paper
from utilrag.report.collect import (
    STAGE_ORDER,
    Collected,
    Picture,
    annotator_warning,
    at,
    collect,
    parameters,
    size,
)
from utilrag.report.render import Block, Code, Heading, Image, Para, Table, to_html, to_markdown
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import ReportSummary

__all__ = ["annotator_warning", "build", "parameters", "run"]
MARK = "†"


def _not_run(root: str, what: str, rel: str) -> Para:
    return Para(f"Not run: no committed {what} under {at(root, rel)}.", "muted")


def _image(pictures: dict[str, Picture], key: str) -> list[Block]:
    p = pictures.get(key)
    return [Image(p.alt, p.name, p.data)] if p else []


def _listing(items: list[str], most: int = 8) -> str:
    return ", ".join(items[:most]) + (f", … (+{len(items) - most} more)" if len(items) > most else "")


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


# --------------------------------------------------------------------------- sections
def header(data: dict) -> list[Block]:
    version, versions = data["code_version"], data["output_code_versions"]
    blocks: list[Block] = [
        Heading("utilrag report", 1),
        Table(
            ["", ""],
            [
                ["run directory", data["run_dir"]],
                ["generated", data["generated_at"]],
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
    for note in data["notes"]:
        blocks.append(Para(note, "warn"))
    for f in data["incomplete"]:
        blocks.append(Para(f"left out, not complete: {f['why']}", "warn"))
    blocks.append(
        Code(
            "The exact config (cfg.model_dump(), defaults included)",
            yaml.safe_dump(data["config"], sort_keys=False),
            "yaml",
        )
    )
    return blocks


def retrieval(root: str, data: dict, pictures: dict[str, Picture]) -> tuple[list[Block], str]:
    """Every run not made by a train setting (the baselines) first, then the label-settings table (one
    retriever per train setting, marked against the human-label one: the paper's comparison)."""
    blocks: list[Block] = [Heading("Retrieval")]
    if not data["ran"]:
        return [*blocks, _not_run(root, "evaluation", "evaluate")], ""
    metrics, baseline, settings_baseline = data["metrics"], data["baseline"], data["settings_baseline"]
    trained_cells: list[list[str]] = []
    other_cells: list[list[str]] = []
    for r in data["rows"]:
        cells = [
            r["label"] + (" (baseline)" if r["is_reference"] else ""),
            r["dataset"],
            str(r.get("split", "")),
            _int(r.get("queries")),
        ]
        cells += [_num(r.get(m)) + (f" {MARK}" if r["significant"][m] else "") for m in metrics]
        (trained_cells if r["setting"] else other_cells).append(cells)
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
                f"{MARK} p < {data['p_level']} against the {settings_baseline!r} setting's run of the same search, in "
                "both the paired t-test and the paired randomisation test (evaluate/significance.parquet).",
                "muted",
            ),
        ]
    if other_cells:
        table = Table(head, other_cells, right)
        headline = headline or to_markdown([table]).strip()
        blocks += [
            Heading("Baselines" if trained_cells else "Every evaluated run", 3),
            Para(f"Runs from {at(root, 'evaluate')} not made by a train setting; metrics to 4 decimals."),
            table,
        ]
        if data["baselines_tested"]:
            blocks.append(
                Para(
                    f"{MARK} p < {data['p_level']} against the baseline run {baseline!r} on the same dataset and "
                    "metric, in both the paired t-test and the paired randomisation test "
                    "(evaluate/significance.parquet).",
                    "muted",
                )
            )
        elif baseline:
            blocks.append(Para(f"No paired tests of these runs against the baseline {baseline!r}.", "muted"))
        else:
            blocks.append(Para("No paired tests: evaluate.baseline is not set.", "muted"))
    return blocks + settings_blocks + judged(data.get("judged", [])) + _image(pictures, "evaluate-metrics"), headline


def judged(targets: list[dict]) -> list[Block]:
    """The LLM-judged qrels: what was pooled and by whom, and the judge against the dataset's qrels."""
    blocks: list[Block] = []
    for t in targets:
        rows = t["rows"]
        blocks += [
            Heading(f"LLM-judged qrels: {t['folder']}", 3),
            Para(
                f"The top {t['depth']} of {', '.join(t['runs'])} per query ({_int(rows.get('queries'))} queries, "
                f"{_int(rows.get('pairs'))} passages) graded 0-3 by {t['model']}; grade >= {t['threshold']} counts "
                f"relevant. Rows '<dataset> (LLM-judged)' in the tables above are scored on these qrels; "
                f"{_int(rows.get('unparsed'))} judgments did not parse (unjudged)."
            ),
        ]
        if t["circular"]:
            blocks.append(
                Para(
                    "The judge is the annotator: retrievers trained on its labels are graded by it (circular).", "warn"
                )
            )
        a = t.get("agreement")
        if a:
            blocks.append(
                Para(
                    f"Against {a.get('against', 'the qrels')}: Cohen's kappa {a['kappa']} ({a['rule']}), agreement "
                    f"{_num(a['agreement']) if a['agreement'] is not None else '-'} over {_int(a['pairs'])} judged "
                    "passages (judge relevant "
                    f"{_int(a['judge_relevant'])}, qrels relevant {_int(a['qrels_relevant'])}); graded kappa "
                    f"{a['graded_kappa']} over the {_int(a['graded_pairs'])} passages the qrels grade."
                )
            )
            grades = sorted({c["judge"] for c in a["confusion"]})
            cell = {(c["qrels"], c["judge"]): c["passages"] for c in a["confusion"]}
            cells = [
                [h] + [_int(cell.get((h, j), 0)) for j in grades] for h in sorted({c["qrels"] for c in a["confusion"]})
            ]
            blocks.append(Table(["qrels grade \\ judge grade", *grades], cells, set(range(1, len(grades) + 1))))
        else:
            blocks.append(Para("The dataset has no qrels for these queries: no agreement to measure.", "muted"))
    return blocks


def annotation(root: str, data: dict) -> list[Block]:
    blocks: list[Block] = [Heading("Annotation agreement")]
    if not data["ran"]:
        return [*blocks, _not_run(root, "annotation", "annotate")]
    for t in data["targets"]:
        model, params, rows, by_position = t["model"], t["parameters"], t["agreement"], t["agreement_by_shown_position"]
        blocks.append(Heading(f"{t['folder']} — annotator {model}", 3))
        blocks.append(
            Para(
                f"Annotator {model} ({size(params) + ' parameters' if params else 'parameter count unknown'}); "
                f"LLM labels against the human positives of the same pools (micro precision and recall over the "
                f"queries each stage labelled), as the paper's Table 1."
            )
        )
        if t["warning"]:
            blocks.append(Para(t["warning"], "warn"))
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
        kappa = t["graded_kappa"]
        if kappa:
            blocks.append(
                Para(
                    f"Graded judge against the qrels grades: Cohen's kappa {kappa.get('kappa')}, linear-weighted "
                    f"{kappa.get('kappa_linear')}, exact agreement {_pct(kappa.get('exact_agreement'))} over "
                    f"{_int(kappa.get('pairs'))} judged pool passages."
                )
            )
    return blocks


def _label_source(tcfg: dict) -> str:
    labels = str(tcfg.get("labels", "?"))
    if tcfg.get("labels_path"):
        labels += f" ({tcfg['labels_path']})"
    if tcfg.get("human_mix_percent"):
        labels += f", {tcfg['human_mix_percent']:g}% human mixed in"
    if tcfg.get("curriculum_human_percent"):
        labels += f", then curriculum on {tcfg['curriculum_human_percent']:g}% human"
    return labels


def training(root: str, data: dict, pictures: dict[str, Picture]) -> list[Block]:
    blocks: list[Block] = [Heading("Training")]
    if not data["ran"]:
        return [*blocks, _not_run(root, "training run", "train")]
    rows: list[list[str]] = []
    images: list[Block] = []
    for r in data["runs"]:
        tcfg, phases, name = r["config"], r["phases"], r["name"]
        rows.append(
            [
                name,
                str(tcfg.get("model", "?")),
                f"{tcfg.get('dataset', '?')}/{tcfg.get('split', '?')}",
                _label_source(tcfg),
                str(tcfg.get("loss", "?")),
                "; ".join(
                    f"{p.get('name')}: {_int(p.get('steps'))} steps, {_int(p.get('groups'))} groups, "
                    f"positives {p.get('positive_sampling')}"
                    for p in phases
                )
                or "–",
                _int(r["steps"]),
                _num(r["first_loss"], 3),
                _num(r["final_loss_mean10"], 3),
                _duration(r["wall_time_s"]),
            ]
        )
        image = _image(pictures, f"train-{name}-loss")
        if image:
            images += [Heading(f"Loss: {name}", 3), *image]
    blocks.append(
        Table(
            ["run", "base model", "data", "label source", "loss", "phases", "steps", "first loss", "final loss",
             "wall time"],
            rows,
            {6, 7, 8, 9},
        )
    )  # fmt: skip
    blocks.append(Para("final loss: the mean of the last 10 logged steps (rank 0's batches).", "muted"))
    external = [
        (r["name"], p["label_agreement"]) for r in data["runs"] for p in r["phases"][:1] if p.get("label_agreement")
    ]
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
    return blocks + images


RAG_SCORES = ("recall@k", "answer_recall@k", "exact_match", "f1", "rouge_l", "bleu_3", "bleu_4", "bertscore")


def rag(root: str, data: dict, pictures: dict[str, Picture]) -> list[Block]:
    blocks: list[Block] = [Heading("RAG")]
    if not data["ran"]:
        return [*blocks, _not_run(root, "RAG evaluation", "rag")]
    for d in data["datasets"]:
        blocks.append(Heading(f"{d['dataset']}", 3))
        blocks.append(Para("Scores in percent; k: passages given to the generator (0: closed book)."))
        if d.get("references") == "oracle":
            blocks.append(
                Para(
                    "No gold answers: EM, F1 and ROUGE-L score each answer against the generator's answer from the "
                    "question's source passage (the oracle row, itself unscored); recall@k finds that passage."
                )
            )
        blocks.append(
            Table(
                [
                    "retriever",
                    "k",
                    "recall@k",
                    "answer recall@k",
                    "EM",
                    "F1",
                    "ROUGE-L",
                    "BLEU-3",
                    "BLEU-4",
                    "BERTScore",
                    "n",
                ],
                [
                    [str(r.get("retriever")), str(r.get("k"))]
                    + [_num(r.get(key), 1) for key in RAG_SCORES]
                    + [_int(r.get("n"))]
                    for r in d["results"]
                ],
                set(range(1, 11)),
            )
        )
        blocks += _image(pictures, f"rag-{d['dataset']}-f1")
    return blocks


def cost(cfg: PipelineConfig, data: dict) -> list[Block]:
    rcfg = cfg.report
    blocks: list[Block] = [Heading("Cost")]
    rows = []
    for stage in STAGE_ORDER:
        if stage not in data["outputs"]:
            rows.append([stage, "0", "not run"])
        else:
            missing = data["without_time"].get(stage)
            note = f" ({missing} without a recorded time)" if missing else ""
            rows.append([stage, str(data["outputs"][stage]), _duration(data["wall_time_s"][stage]) + note])
    rows.append(["total", str(sum(data["outputs"].values())), _duration(data["total_wall_time_s"])])
    blocks += [
        Para(
            "Wall time per stage, summed over its committed outputs (a reused output keeps the time of the "
            "run that made it)."
        ),
        Table(["stage", "outputs", "wall time"], rows, {1, 2}),
    ]
    token_rows = [
        [
            t["folder"],
            t["stage"],
            _int(t["queries"] or 0),
            _int(t["prompt_tokens"]),
            _int(t["output_tokens"]),
            _num(t["prompt_tokens_per_query"], 1),
            _num((t["output_tokens"] or 0) / t["queries"] if t["queries"] else None, 1),
            _num(t["tokens_per_s"], 1),
            _pct(t["parse_failure_rate"]),
            _duration(t["wall_s"]),
        ]
        for t in data["tokens"]
    ]
    if token_rows:
        blocks += [
            Heading("LLM tokens", 3),
            Para(
                "tokens/s: prompt + output tokens over the generation time of all replicas (– when resumed or reused)."
            ),
            Table(
                ["output", "LLM stage", "queries", "prompt tokens", "output tokens", "prompt tokens/query",
                 "output tokens/query", "tokens/s", "parse failures", "wall time"],
                token_rows,
                set(range(2, 10)),
            ),
        ]  # fmt: skip
    estimates = data["gpu_hours"]
    blocks.append(Heading(f"GPU-hours at MS MARCO scale ({rcfg.scale_queries:,} queries)", 3))
    if not estimates:
        return [*blocks, Para("No estimate: no annotation with token counts.", "muted")]
    blocks.append(
        Para(
            f"Prefill rate MEASURED: {rcfg.prefill_tokens_per_s:,g} prompt tokens/s per GPU ({rcfg.throughput_of}); "
            f"ASSUMED: vLLM reaches {rcfg.vllm_efficiency:.0%} of it and decodes {rcfg.decode_tokens_per_s:,g} "
            "output tokens/s per GPU. The tokens per query are measured in this run (with this run's annotator and "
            "prompts; the prefix cache's share as this run's engine reported it).",
            "warn",
        )
    )
    blocks.append(
        Table(
            ["annotation", "annotator", "prompt tokens/query", "cached", "output tokens/query", "queries", "GPU-hours"],
            [
                [
                    e["folder"],
                    e["model"],
                    _num(e["prompt_tokens_per_query"], 1),
                    _num(e["cached_tokens_per_query"], 1),
                    _num(e["output_tokens_per_query"], 1),
                    _int(e["queries"]),
                    _num(e["gpu_hours"], 1),
                ]
                for e in estimates
            ],
            {2, 3, 4, 5, 6},
        )
    )
    blocks.append(
        Para(
            "GPU-hours = queries × ((prompt − cached) tokens ÷ (prefill rate × vLLM efficiency) + output tokens ÷ "
            "decode rate) ÷ 3600 (utilrag.cost, the model benchmarks/annotation_cost.py uses).",
            "muted",
        )
    )
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
    return blocks


# --------------------------------------------------------------------------- the stage
def render(cfg: PipelineConfig, collected: Collected) -> tuple[list[Block], dict, str]:
    """The report's blocks, its numbers (report.json) and the headline retrieval table (Markdown)."""
    root, s, pictures = collected.root, collected.sections, collected.pictures
    ret, headline = retrieval(root, s["retrieval"], pictures)
    pap, paper_data = paper.section(cfg, s["retrieval"], s["annotation"], s["rag"])
    blocks = (
        header(s["header"])
        + ret
        + annotation(root, s["annotation"])
        + training(root, s["training"], pictures)
        + rag(root, s["rag"], pictures)
        + pap
        + cost(cfg, s["cost"])
    )
    data = {**s["header"], **{k: v for k, v in s.items() if k not in ("header", "cost")}}
    data["paper"], data["cost"] = paper_data, s["cost"]
    return blocks, data, headline


def build(cfg: PipelineConfig) -> tuple[list[Block], dict, str]:
    return render(cfg, collect(cfg))


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
    committed = writer.commit(**ReportSummary(sections=sections, wall_time_s=round(time.time() - t0, 2)).manifest())
    print(headline or "no retrieval evaluation in this run directory", flush=True)
    print(f"report: {committed.path('report.html')}", flush=True)
    return StageResult("report", [committed.folder], {"sections": len(sections)}, wall_s=time.time() - t0)
