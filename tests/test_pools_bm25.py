"""Pools and BM25 on the real datasets, through the stage entry points."""

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from utilrag.data import ingest, run_pools
from utilrag.data.pools import build_pools, interleave, shuffle_given_pools
from utilrag.evaluate import run_evaluation
from utilrag.index.bm25 import run_bm25


@pytest.fixture(scope="module")
def real_cfg(tmp_path_factory, shared_datasets):
    from utilrag.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "data_root": str(shared_datasets),
            "output_dir": str(tmp_path_factory.mktemp("out")),
            "ingest": {"datasets": [{"name": "scifact"}, {"name": "trec-dl-2019"}]},
            "pools": [
                {"dataset": "trec-dl-2019", "split": "default", "run": "bm25", "size": 31},
                {"dataset": "scifact", "split": "train", "size": 31, "seed": 3, "max_queries": 50},
            ],
            "bm25": [{"dataset": "scifact", "split": "test"}],
            "evaluate": {
                "runs": [
                    {"dataset": "scifact", "split": "test", "run": "bm25s"},
                    {"dataset": "trec-dl-2019", "run": "bm25"},
                ]
            },
        }
    )


def test_dl19_pools_from_the_bm25_run(ray_local, real_cfg):
    ingest(real_cfg)
    pools = pq.read_table(Path(run_pools(real_cfg, real_cfg.pools[0])[0]) / "pools.parquet").to_pandas()
    assert pools["query_id"].nunique() == 43
    assert (pools.groupby("query_id").size() == 31).all()
    positives = pools[pools["source"] == "human"]
    assert (positives["human_grade"] >= 2).all()
    assert positives.groupby("query_id").size().min() >= 1
    negatives = pools[pools["source"] == "bm25"]
    assert ((negatives["human_grade"].isna()) | (negatives["human_grade"] < 2)).all()
    # shuffled: positives are not all at the front
    assert positives["position"].mean() > 5


def test_scifact_pools_from_bm25s_are_seeded(ray_local, real_cfg):
    ingest(real_cfg)
    first = pq.read_table(Path(run_pools(real_cfg, real_cfg.pools[1])[0]) / "pools.parquet")
    assert first.to_pandas()["query_id"].nunique() == 50
    assert set(first.column("source").to_pylist()) == {"human", "bm25s"}
    inputs = _inputs_for(first)
    again, _ = build_pools(*inputs, size=31, seed=3, threshold=1, negative_source="bm25s")
    same, _ = build_pools(*inputs, size=31, seed=3, threshold=1, negative_source="bm25s")
    other, _ = build_pools(*inputs, size=31, seed=4, threshold=1, negative_source="bm25s")
    assert again.equals(same)
    assert other.column("doc_id").to_pylist() != again.column("doc_id").to_pylist()
    assert sorted(other.column("doc_id").to_pylist()) == sorted(first.column("doc_id").to_pylist())


def _inputs_for(pools):
    """Rebuild qrels and a run from a pool table (human positives + negatives in rank order)."""
    rows = pools.to_pylist()
    qrels = pa.table(
        {
            "query_id": [r["query_id"] for r in rows if r["source"] == "human"],
            "doc_id": [r["doc_id"] for r in rows if r["source"] == "human"],
            "grade": [1 for r in rows if r["source"] == "human"],
        }
    )
    negs = [r for r in rows if r["source"] != "human"]
    run = pa.table(
        {
            "query_id": [r["query_id"] for r in negs],
            "doc_id": [r["doc_id"] for r in negs],
            "rank": list(range(1, len(negs) + 1)),
        }
    )
    return qrels, run, list(dict.fromkeys(r["query_id"] for r in rows))


def test_pool_edge_cases():
    qrels = pa.table({"query_id": ["a", "a", "b"], "doc_id": ["p1", "p2", "x"], "grade": [1, 1, 0]})
    run = pa.table({"query_id": ["a"] * 4, "doc_id": ["p1", "n1", "n2", "n3"], "rank": [1, 2, 3, 4]})
    pools, stats = build_pools(qrels, run, ["a", "b"], size=4, seed=0, threshold=1, negative_source="r")
    assert stats == {"queries": 1, "no_positive": 1, "short_pool": 0, "positives_cut": 0, "positives_without_text": 0}
    assert sorted(pools.column("doc_id").to_pylist()) == ["n1", "n2", "p1", "p2"]
    # a judged positive with no text in the corpus cannot be shown to an annotator: left out, counted
    shown, stats = build_pools(
        qrels, run, ["a"], size=4, seed=0, threshold=1, negative_source="r", corpus_ids={"p1", "n1", "n2", "n3"}
    )
    assert stats["positives_without_text"] == 1
    assert sorted(shown.column("doc_id").to_pylist()) == ["n1", "n2", "n3", "p1"]
    small, stats = build_pools(qrels, run, ["a"], size=2, seed=0, threshold=1, negative_source="r")
    assert stats["positives_cut"] == 1 and small.num_rows == 2


def test_lexical_and_dense_candidates_interleave_rank_by_rank_each_passage_once():
    lexical = pa.table({"query_id": ["a"] * 3, "doc_id": ["x", "y", "z"], "rank": [1, 2, 3]})
    dense = pa.table({"query_id": ["a"] * 3 + ["b"], "doc_id": ["y", "w", "x", "v"], "rank": [1, 2, 3, 1]})
    both = interleave([("bm25s", lexical), ("dense:minilm", dense)])
    assert [(d, r, s) for q, d, r, s in zip(*both.to_pydict().values()) if q == "a"] == [
        ("x", 1, "bm25s"),
        ("y", 2, "dense:minilm"),
        ("w", 3, "dense:minilm"),  # y again at depth 2 of bm25s: already in
        ("z", 4, "bm25s"),
    ]
    assert both.filter(pc.equal(both["query_id"], "b"))["source"].to_pylist() == ["dense:minilm"]
    # the pool's negatives keep the run each came from; a human positive stays "human"
    qrels = pa.table({"query_id": ["a"], "doc_id": ["z"], "grade": [1]})
    pools, _ = build_pools(qrels, both, ["a"], size=3, seed=0, threshold=1, negative_source="bm25s")
    assert dict(zip(pools["doc_id"].to_pylist(), pools["source"].to_pylist())) == {
        "z": "human",
        "x": "bm25s",
        "y": "dense:minilm",
    }


def test_pools_dense_must_name_an_untrained_full_search_of_the_split(tmp_path):
    from utilrag.config import PipelineConfig

    base = {
        "output_dir": str(tmp_path),
        "ingest": {"datasets": [{"name": "scifact"}]},
        "pools": [{"dataset": "scifact", "split": "train", "dense": "minilm"}],
    }
    with pytest.raises(ValueError, match="dense 'minilm' names no index.targets entry"):
        PipelineConfig.model_validate(base)
    wrong = {**base, "index": {"targets": [{"dataset": "scifact", "split": "test", "label": "minilm"}]}}
    with pytest.raises(ValueError, match="must be a full search of split 'train'"):
        PipelineConfig.model_validate(wrong)
    trained = {
        **base,
        "index": {"targets": [{"dataset": "scifact", "split": "train", "label": "minilm", "model": "train:x"}]},
    }
    with pytest.raises(ValueError, match="off-the-shelf encoder"):
        PipelineConfig.model_validate(trained)
    reranking = {
        **base,
        "index": {"targets": [{"dataset": "scifact", "split": "train", "label": "minilm", "rerank": "bm25"}]},
    }
    with pytest.raises(ValueError, match="must be a full search"):
        PipelineConfig.model_validate(reranking)
    right = {**base, "index": {"targets": [{"dataset": "scifact", "split": "train", "label": "minilm"}]}}
    from utilrag.pipeline import select_stages

    assert select_stages(PipelineConfig.model_validate(right))[:3] == ["ingest", "candidates", "pools"]


def test_bm25s_on_scifact_and_the_evaluation_table(ray_local, real_cfg, capsys):
    ingest(real_cfg)
    out = Path(run_bm25(real_cfg, real_cfg.bm25[0])[0])
    run = pq.read_table(out / "run.parquet")
    assert run.to_pandas().groupby("query_id").size().max() == 1000
    assert (out / "run.trec").read_text().splitlines()[0].split()[1] == "Q0"
    rows = run_evaluation(real_cfg)
    by_label = {r["label"]: r for r in rows}
    assert by_label["bm25s"]["queries"] == 300
    assert 0.66 <= by_label["bm25s"]["nDCG@10"] <= 0.69  # published BEIR BM25: 0.665
    assert by_label["bm25"]["nDCG@10"] == pytest.approx(0.5058, abs=1e-4)
    printed = capsys.readouterr().out
    assert "| bm25s | scifact | 300 |" in printed
    evaluate_dir = real_cfg.output_dir + "/evaluate"
    for name in ("metrics.csv", "metrics.md", "metrics.png", "per_query.parquet", "manifest.json"):
        assert Path(evaluate_dir, name).is_file(), name


def test_given_pools_are_shuffled_so_the_human_positive_is_shown_anywhere():
    """Tevatron pools list the positive first; after the pools stage it is at a uniform position."""
    from collections import Counter

    from utilrag.data.tables import SCHEMAS

    queries, size = 3100, 31
    rows = [
        {
            "query_id": f"q{q}",
            "doc_id": f"d{q}-{i}",
            "position": i,
            "source": "human" if i == 0 else "tevatron",
            "human_grade": 1 if i == 0 else None,
        }
        for q in range(queries)
        for i in range(size)
    ]
    given = pa.Table.from_pylist(rows)
    shuffled, stats = shuffle_given_pools(given.cast(SCHEMAS["pools"]), seed=0)
    assert stats == {"queries": queries, "given": True, "shuffled_with_seed": 0}
    assert shuffled.num_rows == queries * size
    at = Counter(r["position"] for r in shuffled.to_pylist() if r["source"] == "human")
    # uniform over the 31 positions: chi-square with 30 degrees of freedom, p = 0.001 at 59.7
    expected = queries / size
    chi2 = sum((at.get(i, 0) - expected) ** 2 / expected for i in range(size))
    assert chi2 < 59.7, at
    again, _ = shuffle_given_pools(given.cast(SCHEMAS["pools"]), seed=0)
    assert again.equals(shuffled)  # seeded: the same order every run
    other, _ = shuffle_given_pools(given.cast(SCHEMAS["pools"]), seed=1)
    assert not other.equals(shuffled)
    subset, _ = shuffle_given_pools(given.cast(SCHEMAS["pools"]), seed=0, max_queries=10)
    mine = {r["query_id"]: [] for r in subset.to_pylist()}
    for r in subset.to_pylist():
        mine[r["query_id"]].append(r["doc_id"])
    full = {}
    for r in shuffled.to_pylist():
        full.setdefault(r["query_id"], []).append(r["doc_id"])
    assert len(mine) == 10 and all(mine[q] == full[q] for q in mine)  # per-query order stable under subsetting
