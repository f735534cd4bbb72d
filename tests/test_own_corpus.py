"""Your own corpus, no labels (issue 24): a plain JSONL file of 200 SciFact abstracts (no queries, no
qrels) runs the whole path -- generated questions, pools, LLM labels, a trained retriever, LLM-judged
qrels, metrics -- and every stage reruns from its manifest. The tiny random LLM writes the questions,
labels and grades (plumbing, not quality); constrained decoding gives it parseable grades."""

from __future__ import annotations

import gzip
import json
import logging

import pyarrow.parquet as pq
import pytest

from conftest import TINY_TRAIN, write_lines
from utilrag.annotate.querygen import TEST_SPLIT, TRAIN_SPLIT, document_of, heldout
from utilrag.annotate.tiny import make_tiny_llm, qwen_tokenizer_dir
from utilrag.config import ConfigError
from utilrag.data.tables import read_table
from utilrag.errors import UtilragError
from utilrag.evaluate.judge import agree, render_agreement
from utilrag.store import read_manifest


def test_questions_are_held_out_by_document():
    passages = [f"doc{d}#{k}" for d in range(200) for k in range(3)]
    sides = {document_of(p): heldout(document_of(p), 20.0, 0) for p in passages}
    assert {document_of(p) for p in passages} == {f"doc{d}" for d in range(200)}
    assert 25 <= sum(sides.values()) <= 55  # about 20% of 200 documents
    for p in passages:  # every passage of a document on its document's side
        assert heldout(document_of(p), 20.0, 0) == sides[document_of(p)]


def test_agreement_rule_and_confusion():
    judged = {("q", "a"): 3, ("q", "b"): 0, ("q", "c"): 2, ("q", "d"): None}
    human = {("q", "a"): 2, ("q", "b"): 0}  # c: unjudged by the qrels, counted not relevant
    got = agree(judged, human, threshold=2, human_threshold=1)
    assert (got["pairs"], got["judge_relevant"], got["qrels_relevant"], got["agreement"]) == (3, 2, 1, 0.6667)
    assert got["kappa"] == 0.4  # po 2/3, pe (1/3*2/3 + 2/3*1/3) = 4/9
    assert {(c["qrels"], c["judge"]): c["passages"] for c in got["confusion"]} == {
        ("2", "3"): 1,
        ("0", "0"): 1,
        ("unjudged", "2"): 1,
        ("unjudged", "unparsed"): 1,
    }
    assert "| unjudged | 0 | 1 | 0 | 1 |" in render_agreement("x", "m", got)


def test_a_judge_or_querygen_without_a_model_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="judge.model: no model"):
        make_config({"ingest": {"datasets": [{"name": "x"}]}, "judge": {"targets": [{"dataset": "x", "split": "all"}]}})


@pytest.mark.slow
def test_own_corpus_from_plain_jsonl_to_judged_metrics(
    ray_local, shared_datasets, tmp_path, make_config, tiny_encoder, tmp_path_factory, caplog
):
    from utilrag.pipeline import run_pipeline
    from utilrag.qa_metrics import f1_score

    qwen_tokenizer_dir()
    llm = str(make_tiny_llm(tmp_path_factory.mktemp("tiny-llm")))
    with gzip.open(shared_datasets / "scifact" / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(next(f)) for _ in range(200)]
    write_lines(tmp_path / "mine" / "abstracts.jsonl", [json.dumps({"id": d["_id"], "text": d["text"]}) for d in docs])
    engine = {
        "dtype": "float32",
        "max_model_len": 2048,
        "enforce_eager": True,
        "kv_cache_gib": 1,
        "async_engine": False,
        "in_process": True,  # one vLLM import per engine start, not two: ~15 s less for each of the three
    }
    cfg = make_config(
        {
            "ray": {"num_cpus": 2},
            "ingest": {"datasets": [{"name": "mine", "path": str(tmp_path / "mine"), "layout": "plain"}]},
            "querygen": {  # sampled at temperature 1: the random model's greedy questions are all alike
                "dataset": "mine",
                "passages": 16,
                "heldout_percent": 30,
                "seed": 5,  # 4 of the 16 sampled passages' documents held out
                "filter": "none",
                "min_words": 1,
                "temperature": 1.0,
            },
            # candidates: BM25's and the untuned encoder's (searched first: stage candidates), rank by rank
            "pools": [{"dataset": "mine", "split": TRAIN_SPLIT, "size": 8, "dense": "cand"}],
            "bm25": [{"dataset": "mine", "split": TEST_SPLIT, "k": 20}],
            "annotate": {
                "model": llm,
                "targets": [{"dataset": "mine", "split": TRAIN_SPLIT}],
                "stages": ["relsel", "answer", "utilsel"],
                "human_positive": "inclusion",  # the source passage: a positive whatever the random model says
                "passage_words": 20,
                "sampling": {"temperature": 0, "max_tokens": 24, "answer_max_tokens": 8, "constrained": True},
                "engine": engine,
                "scale": {"batch_size": 4},
            },
            "train": {
                **TINY_TRAIN,
                "dataset": "mine",
                "split": TRAIN_SPLIT,
                "model": tiny_encoder,
                "max_steps": 2,
                "settings": [{"name": "utilsel", "labels": "utilsel"}],
            },
            "index": {
                "model": tiny_encoder,
                "batch_size": 64,
                "shards": 1,
                "k": 10,
                "query_max_len": 16,
                "passage_max_len": 32,
                "targets": [{"dataset": "mine", "split": TRAIN_SPLIT, "label": "cand", "k": 20}],
                "trained_targets": [{"dataset": "mine", "split": TEST_SPLIT}],
            },
            "judge": {"targets": [{"dataset": "mine", "split": TEST_SPLIT}], "depth": 3},
            "evaluate": {
                "metrics": ["nDCG@10", "R@100"],
                "runs": [{"dataset": "mine", "split": TEST_SPLIT, "run": "bm25s"}],
                "baseline": "bm25s",
            },
            "rag": {  # no gold answers: scored against the answer from each question's source passage
                "dataset": "mine",
                "split": TEST_SPLIT,
                "k": [1],
                "retrievers": [{"run": "bm25s"}],
                "model": llm,
                "passage_words": 20,
                "sampling": {"answer_max_tokens": 6},
                "engine": engine,
                "scale": {"batch_size": 8},
                "permutations": 100,
            },
        }
    )
    with caplog.at_level(logging.WARNING, logger="utilrag"):
        results = run_pipeline(cfg)
    assert [r.stage for r in results] == [
        "ingest", "querygen", "candidates", "pools", "bm25", "annotate", "train", "index", "judge", "evaluate",
        "rag", "report",
    ]  # fmt: skip
    assert "the judge is the annotator" in caplog.text  # circular: said plainly
    out = tmp_path / "out"

    generated = read_table(out / "querygen" / "mine" / "queries" / "generated.parquet")
    assert generated.num_rows == 16  # one question per sampled passage
    kept = generated.filter(generated.column("kept")).to_pylist()
    by_document = {}
    for g in kept:  # held out by document: no document on both sides
        by_document.setdefault(g["document"], set()).add(g["split"])
    assert all(len(s) == 1 for s in by_document.values())
    splits = {g["split"] for g in kept}
    assert splits == {TRAIN_SPLIT, TEST_SPLIT}
    qrels = read_table(out / "querygen" / "mine" / "queries" / "qrels").to_pylist()
    assert sorted((q["query_id"], q["doc_id"]) for q in qrels) == sorted((g["query_id"], g["doc_id"]) for g in kept)

    pools = pq.read_table(out / "pools" / f"mine-{TRAIN_SPLIT}" / "pools.parquet")
    train_queries = {g["query_id"] for g in kept if g["split"] == TRAIN_SPLIT}
    assert set(pools.column("query_id").to_pylist()) == train_queries
    sources = set(pools.column("source").to_pylist())
    assert {"human", "bm25s", "dense:cand"} <= sources  # the source passage, and both runs' candidates
    labels = pq.read_table(out / "annotate" / f"mine-{TRAIN_SPLIT}" / "labels.parquet")
    assert "utilsel" in set(labels.column("source").to_pylist())
    assert read_manifest(out / "train" / "utilsel")["status"] == "complete"

    judge = read_manifest(out / "judge" / f"mine-{TEST_SPLIT}" / "qrels")
    assert judge["circular"] is True and judge["depth"] == 3
    assert set(judge["runs"]) == {"bm25s", "utilsel"}
    judged = read_table(out / "judge" / f"mine-{TEST_SPLIT}" / "qrels" / "qrels")
    assert judged.num_rows == judge["rows"]["pairs"] - judge["rows"]["unparsed"] > 0
    assert judge["agreement"]["pairs"] > 0  # against the source passages (the only qrels there are)

    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    datasets = {(r["label"], r["dataset"]) for r in metrics}
    for label in ("bm25s", "utilsel"):
        assert {(label, "mine"), (label, "mine (LLM-judged)")} <= datasets
    test_queries = sum(g["split"] == TEST_SPLIT for g in kept)
    assert all(r["queries"] == test_queries for r in metrics if r["dataset"] == "mine")

    # RAG over the corpus: the held-out questions, BM25's top passage, the source passage as the oracle row
    rag = read_manifest(out / "rag" / "mine" / "report")
    assert rag["references"] == "oracle"
    rows = {r["retriever"]: r for r in rag["results"]}
    assert set(rows) == {"closed-book", "bm25s", "oracle"} and all(r["n"] == test_queries for r in rows.values())
    assert rows["oracle"]["f1"] is None and rows["oracle"]["recall@k"] == 100.0  # the reference: unscored
    assert rows["bm25s"]["f1"] is not None and rows["bm25s"]["recall@k"] is not None  # ids shared: recall
    per_query = pq.read_table(out / "rag" / "mine" / "report" / "per_query.parquet").to_pylist()
    reference = {r["query_id"]: r["prediction"] for r in per_query if r["label"] == "oracle"}
    for r in per_query:
        if r["label"] != "oracle":
            expected = f1_score(r["prediction"], reference[r["query_id"]]) if reference[r["query_id"]] else 0.0
            assert r["f1"] == pytest.approx(expected)

    again = run_pipeline(cfg)  # every stage reruns from its manifest (annotate re-cuts its labels from its parts)
    assert {r.stage: r.reused for r in again if r.stage not in ("evaluate", "report")} == {
        "ingest": 1, "querygen": 1, "candidates": 2, "pools": 1, "bm25": 1, "annotate": 0, "train": 1, "index": 4,
        "judge": 1, "rag": 0,
    }  # fmt: skip


def test_querygen_on_a_dataset_without_a_corpus_is_one_line(make_config, tmp_path):
    from utilrag.annotate.querygen import run

    cfg = make_config(
        {
            "ingest": {"datasets": [{"name": "x"}]},
            "querygen": {"dataset": "x", "model": "m"},
        }
    )
    with pytest.raises(UtilragError, match="dataset 'x'"):
        run(cfg)


def test_the_own_corpus_config_plans_the_whole_path(tmp_path):
    from utilrag.config import load_config
    from utilrag.paths import REPO_ROOT
    from utilrag.pipeline import select_stages
    from utilrag.plan import make_plan

    cfg = load_config(REPO_ROOT / "jobs" / "configs" / "own-corpus.yaml", [f"ingest.datasets.0.path={tmp_path}"])
    stages = select_stages(cfg)
    assert stages == [
        "ingest",
        "querygen",
        "candidates",
        "pools",
        "bm25",
        "annotate",
        "train",
        "index",
        "judge",
        "evaluate",
        "rag",
        "report",
    ]
    lines = make_plan(cfg, stages).lines()
    assert "annotation: relsel -> answer -> utilsel" in lines  # the stages its settings need, no more
    assert "pools own/gen-train: 31 passages from bm25s + dense:minilm-candidates (stage candidates)" in lines
    assert any(line.startswith("querygen: 1 question(s) for each of 200 sampled passages of own") for line in lines)
    judge = next(line for line in lines if line.startswith("judge own/gen-test"))
    assert "top 10 of bm25s, minilm, utilsel, source" in judge and "circular" in judge


def test_a_question_keeps_its_leading_numbers_and_loses_list_marks():
    from utilrag.annotate.prompts import clean_question

    cases = {
        "1918 flu pandemic deaths?": "1918 flu pandemic deaths?",
        "3D printing cost?": "3D printing cost?",
        ".NET runtime?": ".NET runtime?",
        "1. what is x?": "what is x?",
        "- Question: why y?\nmore": "why y?",
        '\n  "Question 2: how z?"': "how z?",
    }
    assert {raw: clean_question(raw) for raw in cases} == cases
