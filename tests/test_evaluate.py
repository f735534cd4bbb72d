"""Metrics against published numbers on the real DL19 runs, and against hand-computed values."""

import json
import math
import subprocess
import sys

import pyarrow as pa
import pytest

from conftest import write_lines
from utilrag.evaluate import evaluate

DL19 = "trec-dl-2019"


def eval_run(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "utilrag.cli", "eval-run", *args], capture_output=True, text=True, timeout=120
    )
    return proc


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
    proc = eval_run("--qrels", str(shared_datasets / DL19 / "qrels.txt"), "--run", str(run))
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
