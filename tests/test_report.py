"""The report stage over a fake run directory: small synthetic outputs committed through the store
(evaluate + significance, annotate, train, later rag), no Ray and no models."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from utilrag import store
from utilrag.pipeline import configured, select_stages
from utilrag.report import annotator_warning, parameters
from utilrag.stages import get_stage
from utilrag.store import Store

METRICS = ["nDCG@10", "MRR@10", "R@100"]
RESULTS = [
    {"label": "bm25s", "dataset": "scifact", "split": "test", "queries": 300, "nDCG@10": 0.6651, "MRR@10": 0.6301,
     "R@100": 0.9253},
    {"label": "dense", "dataset": "scifact", "split": "test", "queries": 300, "nDCG@10": 0.7123, "MRR@10": 0.6419,
     "R@100": 0.9512},
]  # fmt: skip
# Hand-computed: (8000 + 2000 + 9000) / 4 = 4750 prompt and (400 + 600 + 200) / 4 = 300 output tokens per
# query, none cached; 491,007 queries x (4750 / (9287 x 0.8) + 300 / 800) / 3600 = 138.3459 GPU-hours.
GPU_HOURS = 491_007 * (4750 / (9287 * 0.8) + 300 / 800) / 3600
SUMMARIES = {
    "relsel": {"queries": 4, "prompt_tokens": 8000, "output_tokens": 400, "prompt_tokens_per_query": 2000.0,
               "tokens_per_s": 120.0, "generate_s": 70.0, "wall_s": 80.0, "parse_failure_rate": 0.25},
    "answer": {"queries": 4, "prompt_tokens": 2000, "output_tokens": 600, "prompt_tokens_per_query": 500.0,
               "tokens_per_s": 100.0, "generate_s": 26.0, "wall_s": 30.0, "parse_failure_rate": 0.0},
    "utilsel": {"queries": 4, "prompt_tokens": 9000, "output_tokens": 200, "prompt_tokens_per_query": 2250.0,
                "tokens_per_s": 92.0, "generate_s": 100.0, "wall_s": 110.0, "parse_failure_rate": 0.5},
}  # fmt: skip
WARNING = "labels from a 135M-parameter annotator"


def _png(path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 2, 1.5])
    ax.set_title(title)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def _commit(folder: str, stage: str, files: dict, **fields) -> None:
    writer = store.begin(folder, stage, None)
    for name, content in files.items():
        path = writer.local_path(name)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    writer.commit(**fields)


def fake_run(root: str, with_rag: bool) -> None:
    layout = Store(root)
    tests = pa.Table.from_pylist(
        [
            {"dataset": "scifact", "label": "dense", "metric": "nDCG@10", "queries": 300, "delta": 0.047,
             "t_p": 0.001, "rand_p": 0.002},
            {"dataset": "scifact", "label": "dense", "metric": "MRR@10", "queries": 300, "delta": 0.012,
             "t_p": 0.30, "rand_p": 0.31},
            {"dataset": "scifact", "label": "dense", "metric": "R@100", "queries": 300, "delta": 0.026,
             "t_p": 0.04, "rand_p": 0.07},  # one test only: no mark
        ]
    )  # fmt: skip
    _commit(
        layout.evaluate(),
        "evaluate",
        {
            "metrics.png": lambda p: _png(p, "metrics"),
            "significance.parquet": lambda p: pq.write_table(tests, p),
            "metrics.json": json.dumps(RESULTS),
        },
        metrics=METRICS,
        results=RESULTS,
        wall_time_s=3.5,
    )
    report = {
        "agreement": [
            {"source": "relsel", "queries": 4, "precision": 0.0312, "recall": 0.25, "positives_per_query": 8.0,
             "queries_without_positive": 0, "parse_failure_rate": 0.25},
            {"source": "utilsel", "queries": 4, "precision": 0.0417, "recall": 0.25, "positives_per_query": 6.0,
             "queries_without_positive": 1, "parse_failure_rate": 0.5},
        ],
        "agreement_by_shown_position": [
            {"source": "relsel", "shown_at": "1", "human_positives": 1, "recall": 1.0},
            {"source": "relsel", "shown_at": "11-20", "human_positives": 3, "recall": 0.0},
            {"source": "utilsel", "shown_at": "1", "human_positives": 1, "recall": 0.0},
        ],
        "graded_kappa": None,
        "stages": SUMMARIES,
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }  # fmt: skip
    _commit(
        layout.annotate("scifact", "train"),
        "annotate",
        {"report.json": json.dumps(report), "labels.parquet": lambda p: pq.write_table(pa.table({"x": [1]}), p)},
        summaries=SUMMARIES,
        wall_time_s=222.0,
    )
    metrics_csv = "phase,step,global_step,loss,lr\n" + "".join(
        f"utilsel,{s},{s},{3.0 - 0.1 * s},1e-5\n" for s in range(1, 13)
    )
    _commit(
        layout.train("util-cl"),
        "train",
        {"metrics.csv": metrics_csv, "loss.png": lambda p: _png(p, "loss")},
        config={"model": "bert-base-uncased", "dataset": "scifact", "split": "train", "labels": "utilsel",
                "loss": "summarg", "curriculum_human_percent": 20.0},
        phases=[{"name": "utilsel", "steps": 10, "offset": 0, "groups": 40, "positive_sampling": "all"},
                {"name": "curriculum-human", "steps": 2, "offset": 10, "groups": 8, "positive_sampling": "one"}],
        wall_time_s=61.0,
    )  # fmt: skip
    if with_rag:
        results = [
            {"retriever": "closed-book", "k": 0, "recall@k": None, "answer_recall@k": None, "exact_match": 2.0,
             "f1": 7.5, "rouge_l": 6.0, "bleu_4": 1.0, "n": 20},
            {"retriever": "dense", "k": 5, "recall@k": 55.0, "answer_recall@k": 60.0, "exact_match": 12.5,
             "f1": 21.25, "rouge_l": 19.0, "bleu_4": 5.0, "n": 20},
        ]  # fmt: skip
        _commit(
            layout.rag("squad", "report"),
            "rag",
            {"results.json": json.dumps(results), "f1.png": lambda p: _png(p, "f1")},
            results=results,
            generation={"queries": 20, "prompt_tokens": 4000, "output_tokens": 300, "wall_s": 9.0},
            wall_time_s=12.0,
        )


@pytest.fixture
def cfg(make_config):
    return make_config(
        {
            "ingest": {"datasets": [{"name": "scifact"}]},
            "evaluate": {
                "metrics": METRICS,
                "baseline": "bm25s",
                "runs": [{"dataset": "scifact", "split": "test", "run": "bm25s"},
                         {"dataset": "scifact", "split": "test", "run": "dense"}],
            },
        }
    )  # fmt: skip


def test_report_of_a_fake_run_directory(cfg, capsys):
    root = cfg.output_dir
    fake_run(root, with_rag=False)
    result = get_stage("report").runner()(cfg)
    out = capsys.readouterr().out
    folder = Store(root).report()
    committed = store.require(folder, "report")
    assert result.outputs == [committed.folder]
    assert {"report.md", "report.html", "report.json"} <= set(committed["outputs"])
    md = store.read_text(committed.path("report.md")) or ""
    page = store.read_text(committed.path("report.html")) or ""
    data = json.loads(store.read_text(committed.path("report.json")) or "{}")
    # printed: the headline retrieval table and where the HTML is
    assert "| dense | scifact | test | 300 | 0.7123 †" in out
    assert f"report: {committed.path('report.html')}" in out

    # self-contained HTML: every image a data URI, nothing fetched
    images = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(images) == 2 and all(s.startswith("data:image/png;base64,") for s in images)
    assert 'src="http' not in page and not re.findall(r'(?:src|href)="(?!data:)', page)
    assert "<link" not in page and "<script" not in page
    # the Markdown's images are PNG files beside it
    for name in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert committed.has(name) and store.exists(committed.path(name))

    # retrieval numbers as given, the paired-test mark where both tests say p < 0.05
    assert [{k: r[k] for k in RESULTS[0]} for r in data["retrieval"]["rows"]] == RESULTS
    dense = data["retrieval"]["rows"][1]
    assert dense["significant"] == {"nDCG@10": True, "MRR@10": False, "R@100": False}
    assert "| dense | scifact | test | 300 | 0.7123 † | 0.6419 | 0.9512 |" in md
    assert "| bm25s (baseline) | scifact | test | 300 | 0.6651 | 0.6301 | 0.9253 |" in md
    assert "0.7123 †" in page
    assert md.index("## Retrieval") < md.index("## Annotation agreement")  # the baseline table first

    # the near-random warning right before the agreement table, the numbers still there
    warn_at = md.index(WARNING)
    table_at = md.index("| stage | queries | precision | recall | positives/query")
    assert warn_at < table_at and "\n|" not in md[warn_at:table_at] and "#" not in md[warn_at:table_at]
    assert "| relsel | 4 | 3.1% | 25.0% | 8.00 | 0 | 25.0% |" in md
    assert "| relsel | 100.0% (1) | 0.0% (3) |" in md  # by shown position
    assert WARNING in page and page.index(WARNING) < page.index("<th>stage</th><th class=n>queries</th>")
    assert "do not reproduce the paper (Qwen2.5-32B)" in data["annotation"]["targets"][0]["warning"]

    # training: label source, phases, steps, wall time, loss curve
    run = data["training"]["runs"][0]
    assert run["labels"] == "utilsel" and run["steps"] == 12 and run["wall_time_s"] == 61.0
    assert "utilsel, then curriculum on 20% human" in md and "curriculum-human: 2 steps" in md

    # cost: wall time per stage, tokens, the GPU-hour estimate (assumed throughput, said so)
    assert data["cost"]["wall_time_s"] == {"annotate": 222.0, "train": 61.0, "evaluate": 3.5}
    estimate = data["cost"]["gpu_hours"][0]
    assert estimate["tokens_per_query"] == pytest.approx(5050)
    assert estimate["gpu_hours"] == pytest.approx(GPU_HOURS) == pytest.approx(138.3459, abs=1e-4)
    assert f"| {GPU_HOURS:,.1f} |" in md and "138.3" in md
    assert "Prefill rate MEASURED: 9,287 prompt tokens/s per GPU" in md and "ASSUMED: vLLM reaches 80%" in md
    assert data["cost"]["assumption"]["measured"] == ["prefill_tokens_per_s"]

    # the paper's label statistics beside the run's (marked: not the paper's run)
    pairs = {(p["paper"], p["metric"]): p["ours_value"] for p in data["paper"]["pairs"]}
    assert pairs[("relsel (Qwen-2.5-32B, MS MARCO)", "precision")] == pytest.approx(3.12)
    assert "annotator (SmolLM2-135M-Instruct, not Qwen-2.5-32B)" in data["paper"]["differences"]
    # a stage that did not run says so in one line
    assert data["rag"] == {"ran": False, "datasets": []}
    rag_section = md.split("## RAG", 1)[1].split("## Paper beside ours", 1)[0].strip()
    assert rag_section.startswith("Not run: no committed RAG evaluation under") and "\n" not in rag_section
    # the header: run directory, code version, the exact config
    assert root in md and store.code_version() in md and "baseline: bm25s" in md


def test_report_rewrites_its_outputs(cfg):
    root = cfg.output_dir
    fake_run(root, with_rag=False)
    get_stage("report").runner()(cfg)
    first = store.require(Store(root).report(), "report")
    fake_run(root, with_rag=True)  # now with a RAG evaluation
    get_stage("report").runner()(cfg)
    second = store.require(Store(root).report(), "report")
    assert "rag-squad-f1.png" in second["outputs"] and "rag-squad-f1.png" not in first["outputs"]
    md = store.read_text(second.path("report.md")) or ""
    assert "Not run: no committed RAG" not in md
    assert "| dense | 5 | 55.0 | 60.0 | 12.5 | 21.2 | 19.0 | – | 5.0 | – | 20 |" in md
    assert "| rag/squad/report | rag | 20 | 4,000 | 300 |" in md
    data = json.loads(store.read_text(second.path("report.json")) or "{}")
    assert data["rag"]["datasets"][0]["results"][1]["f1"] == 21.25
    assert not [n for n in store.list_names(Store(root).report()) if n.startswith(".staging")]


def test_a_stage_interrupted_is_left_out(cfg):
    root = cfg.output_dir
    fake_run(root, with_rag=False)
    store.begin(Store(root).train("broken"), "train", None)  # a running marker, never committed
    get_stage("report").runner()(cfg)
    data = json.loads(store.read_text(store.require(Store(root).report(), "r").path("report.json")) or "{}")
    assert [r["name"] for r in data["training"]["runs"]] == ["util-cl"]
    assert data["incomplete"][0]["folder"] == "train/broken" and "running" in data["incomplete"][0]["why"]


def test_annotator_size():
    assert parameters("HuggingFaceTB/SmolLM2-135M-Instruct") == 135e6
    assert parameters("Qwen/Qwen2.5-32B-Instruct-GPTQ-Int8") == 32e9
    assert parameters("meta-llama/Llama-3.1-8B-Instruct") == 8e9
    assert parameters("gpt2") is None
    assert annotator_warning("Qwen/Qwen2.5-32B-Instruct-GPTQ-Int8") is None
    assert (annotator_warning("smollm2-135m-instruct") or "").startswith(WARNING)
    assert "unknown" in (annotator_warning("/models/my-annotator") or "")


def test_report_is_configured_after_any_stage(make_config):
    only_ingest = make_config({"ingest": {"datasets": [{"name": "scifact"}]}})
    assert not configured(only_ingest, "report")
    with_bm25 = make_config(
        {"ingest": {"datasets": [{"name": "scifact"}]}, "bm25": [{"dataset": "scifact", "split": "test"}]}
    )
    assert configured(with_bm25, "report")
    assert select_stages(with_bm25)[-1] == "report"


def test_label_settings_table_after_the_baselines(make_config, capsys):
    """Retrievers of train settings get their own table, marked against the human-label one; the baselines
    keep theirs (first, marked against evaluate.baseline); the settings table is the printed headline."""
    cfg = make_config(
        {
            "ingest": {"datasets": [{"name": "scifact"}]},
            "report": {"notes": ["Local caps: 32 claims."]},
            "evaluate": {"metrics": ["nDCG@10"], "baseline": "bm25s", "settings_baseline": "human",
                         "runs": [{"dataset": "scifact", "split": "test", "run": "bm25s"}]},
        }
    )  # fmt: skip
    rows = [
        {"label": "bm25s", "dataset": "scifact", "split": "test", "queries": 300, "nDCG@10": 0.6651},
        {"label": "human", "dataset": "scifact", "split": "test", "queries": 300, "nDCG@10": 0.6500},
        {"label": "utilsel", "dataset": "scifact", "split": "test", "queries": 300, "nDCG@10": 0.6100},
    ]
    tests = [
        {"dataset": "scifact", "label": "utilsel", "metric": "nDCG@10", "baseline": "human", "queries": 300,
         "delta": -0.04, "t_p": 0.001, "rand_p": 0.002},
    ]  # fmt: skip
    _commit(
        Store(cfg.output_dir).evaluate(),
        "evaluate",
        {"significance.parquet": lambda p: pq.write_table(pa.Table.from_pylist(tests), p)},
        metrics=["nDCG@10"],
        results=rows,
        baseline="bm25s",
        settings_baseline="human",
        settings={"human": "human", "utilsel": "utilsel"},
    )
    get_stage("report").runner()(cfg)
    out = capsys.readouterr().out
    committed = store.require(Store(cfg.output_dir).report(), "report")
    md = store.read_text(committed.path("report.md")) or ""
    assert "Local caps: 32 claims." in md.split("## Retrieval")[0]  # the notes, at the top
    baselines, settings = md.index("### Baselines"), md.index("### Retrievers by label setting")
    assert baselines < settings
    assert "| bm25s (baseline) | scifact | test | 300 | 0.6651 |" in md
    assert "| human (baseline) | scifact | test | 300 | 0.6500 |" in md  # the settings' reference
    assert "| utilsel | scifact | test | 300 | 0.6100 † |" in md and md.index("| utilsel |") > settings
    assert "against the 'human' setting's run" in md
    headline = out.split("report:")[0]
    assert "| utilsel | scifact | test | 300 | 0.6100 † |" in headline and "bm25s" not in headline
    data = json.loads(store.read_text(committed.path("report.json")) or "{}")
    by_label = {r["label"]: r for r in data["retrieval"]["rows"]}
    assert by_label["utilsel"]["setting"] == "utilsel" and by_label["utilsel"]["reference"] == "human"
    assert by_label["bm25s"]["setting"] is None
    # SciFact alone: none of the paper's published rows, said in one line
    assert "This run covers none of the paper's published rows" in md and data["paper"]["pairs"] == []


def test_paper_beside_ours(make_config):
    """The paper's Table 2, ablation and label-statistics numbers beside a run's own where it has the same
    set, metric and label setting, marked with what differs from the paper's run."""
    cfg = make_config(
        {
            "ingest": {"datasets": [{"name": "scifact"}]},
            "annotate": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "train": {"model": "sentence-transformers/all-MiniLM-L6-v2", "settings": [
                {"name": "human", "labels": "human"}, {"name": "utilsel", "labels": "utilsel"},
                {"name": "cl20", "labels": "utilsel", "curriculum_human_percent": 20},
                {"name": "joint", "labels": "utilsel", "loss": "joint"}]},
            "evaluate": {"metrics": ["nDCG@10", "MRR@10"], "runs": []},
        }
    )  # fmt: skip
    rows = [
        {"label": "human", "dataset": "msmarco-passage", "split": "dev.small", "queries": 6980, "nDCG@10": 0.4,
         "MRR@10": 0.3812},
        {"label": "cl20", "dataset": "trec-dl-2019", "split": "default", "queries": 43, "nDCG@10": 0.7,
         "MRR@10": 0.9},
        {"label": "joint", "dataset": "msmarco-passage", "split": "dev.small", "queries": 6980, "nDCG@10": 0.4,
         "MRR@10": 0.331},
        {"label": "utilsel", "dataset": "BEIR-14", "split": "mean", "queries": 40000, "nDCG@10": 0.45,
         "MRR@10": 0.5},
        {"label": "utilsel", "dataset": "scifact", "split": "test", "queries": 300, "nDCG@10": 0.6, "MRR@10": 0.5},
    ]  # fmt: skip
    layout = Store(cfg.output_dir)
    _commit(layout.evaluate(), "evaluate", {}, metrics=["nDCG@10", "MRR@10"], results=rows,
            settings={r["label"]: r["label"] for r in rows})  # fmt: skip
    agreement = [{"source": "utilsel", "queries": 4, "precision": 0.25, "recall": 0.5, "positives_per_query": 2.0}]
    _commit(layout.annotate("scifact", "train"), "annotate",
            {"report.json": json.dumps({"agreement": agreement, "model": "SmolLM2-135M"})})  # fmt: skip
    get_stage("report").runner()(cfg)
    committed = store.require(layout.report(), "report")
    md = store.read_text(committed.path("report.md")) or ""
    data = json.loads(store.read_text(committed.path("report.json")) or "{}")
    got = {(p["ours"], p["paper"], p["metric"]): (round(p["ours_value"], 2), p["paper_value"])
           for p in data["paper"]["pairs"]}  # fmt: skip
    assert got == {
        ("human on msmarco-passage", "Human", "MRR@10"): (38.12, 38.6),
        ("cl20 on trec-dl-2019", "UtilSel + CL 20% human", "nDCG@10"): (70.0, 69.6),
        ("joint on msmarco-passage", "JointLH", "MRR@10"): (33.1, 34.0),
        ("utilsel on BEIR-14", "UtilSel (LLM only)", "nDCG@10"): (45.0, 45.3),
        ("utilsel of scifact-train", "utilsel (Qwen-2.5-32B, MS MARCO)", "precision"): (25.0, 29.5),
        ("utilsel of scifact-train", "utilsel (Qwen-2.5-32B, MS MARCO)", "recall"): (50.0, 84.8),
        ("utilsel of scifact-train", "utilsel (Qwen-2.5-32B, MS MARCO)", "positives per query"): (2.0, 2.9),
    }  # no paper row for SciFact alone, nor MRR@10 on DL19
    differ = data["paper"]["differences"]
    assert [d.split(" (")[0] for d in differ] == ["scale", "annotator", "backbone"]
    section = md.split("## Paper beside ours", 1)[1].split("\n## ", 1)[0]
    assert "Not the paper's run: different scale (scifact" in section
    assert "| retrieval | cl20 on trec-dl-2019 | UtilSel + CL 20% human | nDCG@10 | 70.0 | 69.6 |" in section


def test_external_labels_agreement_in_the_training_section(cfg):
    agreement = {
        "queries": 12,
        "precision": 0.5,
        "recall": 0.4,
        "positives_per_query": 2.0,
        "positives_outside_the_pool": 0,
        "labelled_queries_outside_the_pools": 1,
        "pooled_queries": 24,
    }
    _commit(Store(cfg.output_dir).train("ext"), "train", {},
            config={"model": "m", "dataset": "tiny", "split": "train", "labels": "external",
                    "labels_path": "/data/authors.jsonl", "loss": "summarg"},
            phases=[{"name": "external", "steps": 6, "offset": 0, "groups": 12, "positive_sampling": "all",
                     "label_agreement": agreement}])  # fmt: skip
    get_stage("report").runner()(cfg)
    md = store.read_text(store.require(Store(cfg.output_dir).report(), "report").path("report.md")) or ""
    assert "### External labels against the human positives" in md
    assert "| ext | 12 | 50.0% | 40.0% | 2.00 | 0 | 1 |" in md
    assert "external (/data/authors.jsonl)" in md
