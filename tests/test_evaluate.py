"""Metrics against published numbers on the real DL19 runs, and against hand-computed values."""

import contextlib
import io
import json
import math
import subprocess
import sys

import pyarrow as pa
import pytest

from conftest import write_lines
from utilrag.evaluate import evaluate

DL19 = "trec-dl-2019"


def eval_run(*args, process: bool = False):
    """`utilrag eval-run ARGS`: in this process (main() as the console script calls it: its exit code,
    stdout, stderr), or as a process of its own where the exit status itself is under test."""
    if process:
        return subprocess.run(
            [sys.executable, "-m", "utilrag.cli", "eval-run", *args], capture_output=True, text=True, timeout=120
        )
    from utilrag.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["eval-run", *args])
    return subprocess.CompletedProcess(["utilrag", "eval-run", *args], code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("run, ndcg", [("bm25", 0.5058), ("splade-pp", 0.7308), ("tasb", 0.7210)])
def test_eval_run_matches_published_dl19(shared_datasets, run, ndcg):
    proc = eval_run(
        "--qrels",
        str(shared_datasets / DL19 / "qrels.txt"),
        "--run",
        str(shared_datasets / DL19 / "runs" / f"{run}.trec"),
        "--rel-threshold",
        "2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"nDCG@10", "MRR@10", "R@100", "R@1000", "MAP"}
    assert result["nDCG@10"] == pytest.approx(ndcg, abs=1e-4)


def test_rel_threshold_changes_binary_metrics_only(shared_datasets):
    args = [
        "--qrels",
        str(shared_datasets / DL19 / "qrels.txt"),
        "--run",
        str(shared_datasets / DL19 / "runs" / "bm25.trec"),
        "--json",
    ]
    lenient = json.loads(eval_run(*args, "--rel-threshold", "1").stdout)
    strict = json.loads(eval_run(*args, "--rel-threshold", "2").stdout)
    assert lenient["nDCG@10"] == strict["nDCG@10"]
    assert lenient["MAP"] != strict["MAP"] and lenient["R@100"] != strict["R@100"]


def test_hand_computed_values():
    qrels = pa.table(
        {"query_id": ["q1", "q1", "q2"], "doc_id": ["a", "b", "c"], "grade": [2, 1, 1], "split": ["t"] * 3}
    )
    run = pa.table(
        {
            "query_id": ["q1", "q1", "q1"],
            "doc_id": ["x", "b", "a"],
            "rank": [1, 2, 3],
            "score": [3.0, 2.0, 1.0],
            "run": ["r"] * 3,
        }
    )
    means, per_query = evaluate(qrels, run, ["MRR@10", "nDCG@10", "R@100"], threshold=1)
    # q1: first relevant at rank 2 -> RR 0.5; q2 unanswered -> 0 (trec_eval -c).
    assert per_query["q1"]["MRR@10"] == pytest.approx(0.5)
    assert per_query["q2"] == {"MRR@10": 0.0, "nDCG@10": 0.0, "R@100": 0.0}
    dcg = 1 / math.log2(3) + 2 / math.log2(4)  # trec_eval's linear gains: b (g=1) at rank 2, a (g=2) at 3
    idcg = 2 + 1 / math.log2(3)
    assert per_query["q1"]["nDCG@10"] == pytest.approx(dcg / idcg, abs=1e-4)
    assert means["MRR@10"] == pytest.approx(0.25)
    strict, _ = evaluate(qrels, run, ["MRR@10"], threshold=2)
    assert strict["MRR@10"] == pytest.approx((1 / 3) / 2)


def test_bad_run_file_names_file_and_line(tmp_path, shared_datasets):
    run = write_lines(tmp_path / "bad.trec", ["19335 Q0 1017759 1 2.0 x", "19335 Q0 oops"])
    proc = eval_run("--qrels", str(shared_datasets / DL19 / "qrels.txt"), "--run", str(run), process=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"utilrag: error: {run}:2: expected 6 columns, found 3"
    proc = eval_run("--qrels", str(tmp_path / "none.txt"), "--run", str(run))
    assert proc.returncode == 2 and "none.txt: file not found" in proc.stderr
    proc = eval_run("--qrels", str(shared_datasets / DL19 / "qrels.txt"), "--run", str(tmp_path))
    assert proc.stderr.strip() == f"utilrag: error: {tmp_path}: is a directory, not a run file"
    for score in ("nan", "inf", "-Infinity"):  # a NaN score would sort anywhere: refused with its line
        bad = write_lines(tmp_path / f"{score}.trec", ["19335 Q0 1017759 1 2.0 x", f"19335 Q0 1 2 {score} x"])
        proc = eval_run("--qrels", str(shared_datasets / DL19 / "qrels.txt"), "--run", str(bad))
        assert proc.stderr.strip() == f"utilrag: error: {bad}:2: score {score!r} is not finite"
    proc = eval_run(
        "--qrels",
        str(shared_datasets / DL19 / "qrels.txt"),
        "--run",
        str(shared_datasets / DL19 / "runs" / "bm25.trec"),
        "--metrics",
        "Bogus@3",
    )
    assert proc.returncode == 2 and "unknown metric 'Bogus@3'" in proc.stderr


def test_arguana_and_quora_self_hits_are_dropped_as_beir_does(tmp_path, make_config):
    """ArguAna's queries are corpus documents: retrieved as their own top hit, BEIR's evaluation
    drops them (ignore_identical_ids). A registered arguana does; the same files under another name
    do not, unless asked."""
    from utilrag.data import ingest
    from utilrag.evaluate import run_evaluation

    root = tmp_path / "beir"
    docs = [{"_id": d, "title": "", "text": f"argument {d}"} for d in ("a1", "a2", "a3", "a4")]
    write_lines(root / "corpus.jsonl", [json.dumps(d) for d in docs])
    write_lines(root / "queries.jsonl", [json.dumps({"_id": q, "text": f"argument {q}"}) for q in ("a1", "a2")])
    write_lines(root / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "a1\ta3\t1", "a2\ta4\t1"])
    # each query's own document first, then its relevant counter-argument
    run = write_lines(tmp_path / "run.trec", ["a1 Q0 a1 1 9 r", "a1 Q0 a3 2 8 r", "a2 Q0 a2 1 9 r", "a2 Q0 a4 2 8 r"])
    scores = {}
    for name, flag in (("arguana", None), ("other", None), ("other-asked", True)):
        cfg = make_config(
            {
                "ingest": {"datasets": [{"name": name, "path": str(root), "ignore_identical_ids": flag}]},
                "evaluate": {"metrics": ["MRR@10"], "runs": [{"dataset": name, "split": "test", "run": str(run)}]},
            }
        )
        ingest(cfg)
        scores[name] = run_evaluation(cfg)[0]["MRR@10"]
    assert scores == {"arguana": 1.0, "other": 0.5, "other-asked": 1.0}


def test_cqadupstack_is_its_forums_scored_apart_and_averaged(tmp_path, make_config):
    """A config entry naming cqadupstack stands for its 12 forums; each is scored on its own corpus and
    the table adds their mean (BEIR's CQADupStack figure), saying when forums are missing."""
    from utilrag.config import CQADUPSTACK_FORUMS
    from utilrag.data import ingest
    from utilrag.evaluate import run_evaluation

    cfg = make_config(
        {
            "ingest": {"datasets": [{"name": "cqadupstack", "path": str(tmp_path / "cqa")}]},
            "bm25": [{"dataset": "cqadupstack", "split": "test"}],
            "evaluate": {"runs": [{"dataset": "cqadupstack", "split": "test", "run": "bm25s"}]},
        }
    )
    names = [f"cqadupstack-{f}" for f in CQADUPSTACK_FORUMS]
    assert [d.name for d in cfg.ingest.datasets] == names
    assert cfg.ingest.datasets[3].path == str(tmp_path / "cqa" / "gis")
    assert [b.dataset for b in cfg.bm25] == names and [r.dataset for r in cfg.evaluate.runs] == names

    runs = []
    for forum, hit in (("android", True), ("gis", False)):  # two forums here: MRR 1.0 and 0.5
        root = tmp_path / "cqa" / forum
        write_lines(root / "corpus.jsonl", [json.dumps({"_id": d, "title": "", "text": d}) for d in ("d1", "d2")])
        write_lines(root / "queries.jsonl", [json.dumps({"_id": "q1", "text": "q"})])
        write_lines(root / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1"])
        order = ("d1", "d2") if hit else ("d2", "d1")
        run = write_lines(tmp_path / f"{forum}.trec", [f"q1 Q0 {d} {i} {9 - i} r" for i, d in enumerate(order, 1)])
        runs.append({"dataset": f"cqadupstack-{forum}", "split": "test", "run": str(run), "label": "r"})
    cfg = make_config(
        {
            "ingest": {
                "datasets": [
                    {"name": f"cqadupstack-{f}", "path": str(tmp_path / "cqa" / f)} for f in ("android", "gis")
                ]
            },
            "evaluate": {"metrics": ["MRR@10"], "runs": runs},
        }
    )
    ingest(cfg)
    rows = {r["dataset"]: r for r in run_evaluation(cfg)}
    mean = rows["cqadupstack (2 of 12 forums)"]
    assert mean["MRR@10"] == 0.75 and mean["queries"] == 2 and mean["label"] == "r"


def test_the_beir_14_mean_counts_cqadupstack_once_and_says_when_sets_are_missing():
    """Table 2's "BEIR avg": per run, the unweighted mean over the 14 sets, CQADupStack as its forums'
    mean (one set, not 12); with fewer sets the row says how many; one BEIR set gives no mean row."""
    from utilrag.config import BEIR_14, DATASET_GROUPS
    from utilrag.evaluate import beir_means, group_means

    forums = DATASET_GROUPS["cqadupstack"]
    rows = [
        {"label": "r", "dataset": d, "split": "test", "queries": 10, "nDCG@10": 0.2}
        for d in BEIR_14
        if d != "cqadupstack"
    ]
    rows += [{"label": "r", "dataset": f, "split": "test", "queries": 1, "nDCG@10": 0.9} for f in forums]
    rows += [{"label": "other", "dataset": "scifact", "split": "test", "queries": 10, "nDCG@10": 0.5}]
    rows += group_means(rows, ["nDCG@10"])
    [mean] = beir_means(rows, ["nDCG@10"])
    assert (mean["label"], mean["dataset"]) == ("r", "BEIR-14")
    assert mean["nDCG@10"] == pytest.approx((13 * 0.2 + 0.9) / 14)  # the forums' 0.9 counted once
    assert mean["queries"] == 13 * 10 + len(forums)
    partial = [r for r in rows if r["dataset"] in ("scifact", "nfcorpus", "fiqa")]
    [three] = beir_means(partial, ["nDCG@10"])
    assert three["dataset"] == "BEIR (3 of 14 sets)"
