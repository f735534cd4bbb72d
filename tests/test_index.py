"""Sharded FAISS on Ray actors: exactness against one Flat index, failures, and the index stage
end to end on a small real slice of DL19 (full retrieval and re-ranking)."""

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import write_lines
from utilrag.index.shards import (
    FaissShard,
    ShardDied,
    ShardedIndex,
    ShardError,
    index_layout,
    index_nbytes,
    make_faiss_index,
    training_sample_size,
)


def write_parts(folder, vectors, ids, rows_per_file, dtype=np.float32):
    from utilrag.data.tables import ParquetParts

    dim = vectors.shape[1]
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.from_numpy_dtype(dtype), dim))])
    parts = ParquetParts(folder, schema, rows_per_file)
    flat = pa.array(vectors.astype(dtype).reshape(-1))
    parts.write(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}))
    parts.close()
    return [str(p) for p in sorted(folder.glob("part-*.parquet"))]


@pytest.fixture
def vectors(tmp_path):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((1200, 32)).astype(np.float32)
    ids = [f"d{i}" for i in range(len(docs))]
    return docs, ids, write_parts(tmp_path / "emb", docs, ids, rows_per_file=250), rng.standard_normal((25, 32))


def exact_topk(docs, ids, queries, k):
    import faiss

    flat = faiss.IndexFlatIP(docs.shape[1])
    flat.add(docs)
    scores, rows = flat.search(queries.astype(np.float32), k)
    return scores, [[ids[r] for r in row] for row in rows]


def test_sharded_flat_equals_one_flat_index(ray_local, vectors):
    docs, ids, files, queries = vectors
    index = ShardedIndex(3, cpus_per_shard=0.5)
    try:
        stats = index.build(files, "flat")
        assert sum(s["vectors"] for s in stats) == 1200 and len(stats) == 3
        assert all(s["bytes"] >= s["vectors"] * 32 * 4 for s in stats)
        scores, got = index.search(queries, 50)
    finally:
        index.close()
    want_scores, want = exact_topk(docs, ids, queries, 50)
    assert got == want
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_ivf_with_all_lists_probed_is_exact_and_hnsw_recalls(ray_local, vectors):
    docs, ids, files, queries = vectors
    _, want = exact_topk(docs, ids, queries, 10)
    ivf = ShardedIndex(2)
    try:
        ivf.build(files, "ivf_flat", nlist=8)
        ivf.set_search_params(nprobe=8)
        assert ivf.search(queries, 10)[1] == want
    finally:
        ivf.close()
    hnsw = ShardedIndex(2)
    try:
        hnsw.build(files, "hnsw", hnsw_m=16)
        hnsw.set_search_params(ef_search=256)
        got = hnsw.search(queries, 10)[1]
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
        assert recall >= 0.9
    finally:
        hnsw.close()


def test_shards_that_cannot_be_placed_fail_instead_of_hanging(ray_local):
    with pytest.raises(ShardError, match=r"only 2 of 3 shard actors could start within 5s .*lower index.shards"):
        ShardedIndex(3, cpus_per_shard=1, start_timeout_s=5)


def test_bad_inputs_give_clear_errors(ray_local, tmp_path, vectors):
    docs, ids, files, queries = vectors
    other = write_parts(tmp_path / "emb16", np.ones((300, 16)), [f"x{i}" for i in range(300)], 300)
    index = ShardedIndex(2, cpus_per_shard=0.5)
    try:
        with pytest.raises(ShardError, match="dimension 16, expected 32"):
            index.build(files[:1] + other, "flat", expected_dim=32)
        with pytest.raises(ShardError, match="disagree on the embedding dimension"):
            index.build(files[:1] + other, "flat")
        with pytest.raises(ShardError, match="no embedding files to index"):
            index.build([], "flat")
        with pytest.raises(ShardError, match="embedding file missing: .*nope.parquet"):
            index.build([files[0], str(tmp_path / "nope.parquet")], "flat")
        index.build(files, "flat")
        with pytest.raises(ShardError, match="query dimension 16 != index dimension 32"):
            index.search(np.ones((2, 16)), 5)
        index.save(str(tmp_path / "saved"))
    finally:
        index.close()
    (tmp_path / "saved" / "shard-001.faiss").unlink()
    again = ShardedIndex(2, cpus_per_shard=0.5)
    try:
        with pytest.raises(ShardError, match="missing shard file .*shard-001.faiss"):
            again.load(str(tmp_path / "saved"))
    finally:
        again.close()


def test_dead_shard_fails_loudly_or_is_restarted_from_the_saved_index(ray_local, tmp_path, vectors):
    import ray

    docs, ids, files, queries = vectors
    index = ShardedIndex(3, cpus_per_shard=0.5)
    try:
        index.build(files, "flat")
        expected = index.search(queries, 20)
        ray.kill(index.actors[1])
        with pytest.raises(ShardDied, match="a shard actor died.*refusing a partial result"):
            index.search(queries, 20)
    finally:
        index.close()
    index = ShardedIndex(3, retries=1, cpus_per_shard=0.5)
    try:
        index.build(files, "flat")
        index.save(str(tmp_path / "saved"))
        ray.kill(index.actors[2])
        scores, got = index.search(queries, 20)
        assert got == expected[1]
        np.testing.assert_allclose(scores, expected[0], rtol=1e-5)
    finally:
        index.close()


def test_hnsw_on_the_gpu_is_refused_before_any_work(tmp_path):
    from utilrag.config import IndexConfig

    message = "index_type hnsw cannot run on the GPU"
    with pytest.raises(ShardError, match=message):  # before any actor is asked for a GPU
        ShardedIndex(2, use_gpu=True, index_type="hnsw")
    with pytest.raises(ShardError, match=message):  # before the files are even looked at
        FaissShard(0, use_gpu=True).build([str(tmp_path / "nope.parquet")], "hnsw", 8, 16, 32, None)
    with pytest.raises(ValueError, match=message):  # and at config load, before any encoding
        IndexConfig(use_gpu=True, index_type="hnsw")
    with pytest.raises(ValueError, match=r"must be >= encoders \(2\)"):
        IndexConfig(encoders=2, max_encoders=1)


@pytest.mark.parametrize(
    "kind, fp16", [("flat", False), ("ivf_flat", False), ("ivf_flat", True), ("ivf_pq", False), ("hnsw", False)]
)
def test_index_size_from_its_layout_matches_the_serialized_index(kind, fp16):
    import faiss

    rng = np.random.default_rng(1)
    x = rng.standard_normal((6000, 64)).astype(np.float32)
    index = make_faiss_index(kind, 64, len(x), 64, 16, 16, fp16_storage=fp16)
    index.train(x)
    index.add(x)
    layout = index_layout(index)
    assert layout.get("fp16", False) == fp16
    estimate = index_nbytes(ntotal=index.ntotal, dim=64, **layout)
    assert estimate == pytest.approx(faiss.serialize_index(index).nbytes, rel=0.03)
    if fp16:  # gpu_fp16 on ivf_flat really halves the vector storage (IVF-SQfp16)
        assert index.code_size == 2 * 64
    assert index_nbytes("flat", 1000, 64, fp16=True) * 2 == index_nbytes("flat", 1000, 64)


def test_streaming_shard_build_trains_on_a_seeded_sample_and_keeps_file_order(tmp_path):
    rng = np.random.default_rng(2)
    docs = rng.standard_normal((3000, 32)).astype(np.float32)
    ids = [f"d{i}" for i in range(len(docs))]
    files = write_parts(tmp_path / "emb", docs, ids, rows_per_file=700)
    assert training_sample_size("ivf_flat", 3000, 4) == 1024  # 256 per list, not the whole shard
    assert training_sample_size("ivf_flat", 3000, 1024) == 3000  # lists shrink to 76: all 3,000
    assert training_sample_size("ivf_pq", 10**6, 16) == 65536 and training_sample_size("flat", 10**6, 16) == 0
    shard = FaissShard(0, threads=1)
    stats = shard.build(files, "ivf_flat", 4, 16, 32, 32)
    assert shard.ids == ids and stats["vectors"] == 3000
    assert stats["bytes"] == pytest.approx(__import__("faiss").serialize_index(shard.index).nbytes, rel=0.03)
    centroids = shard.index.quantizer.reconstruct_n(0, 4)
    again = FaissShard(0, threads=1)
    again.build(files, "ivf_flat", 4, 16, 32, 32)
    np.testing.assert_array_equal(again.index.quantizer.reconstruct_n(0, 4), centroids)  # seeded
    shard.set_search_params(nprobe=4, ef_search=16)
    queries = rng.standard_normal((10, 32)).astype(np.float32)
    _, want = exact_topk(docs, ids, queries, 10)
    assert [[ids[r] for r in row] for row in shard.search(queries, 10)[1]] == want
    # float16 files (embedding_dtype: float16) are read into the same float32 index.
    half = FaissShard(1, threads=1)
    half.build(write_parts(tmp_path / "emb16", docs, ids, 700, dtype=np.float16), "flat", 4, 16, 32, 32)
    np.testing.assert_allclose(half.index.reconstruct_n(0, 3000), docs.astype(np.float16), rtol=0, atol=0)
    other = write_parts(tmp_path / "dim16", np.ones((5, 16)), [f"x{i}" for i in range(5)], 5)
    with pytest.raises(ShardError, match=r"shard 0: embeddings have dimension 16 in .*dim16.* but 32 in"):
        FaissShard(0).build(files[:1] + other, "flat", 4, 16, 32, None)


def test_encoder_pool_autoscales_between_encoders_and_max_encoders():
    from utilrag.index.encode import encoder_pool

    pool = encoder_pool(1, 3)
    assert (pool.min_size, pool.max_size) == (1, 3)
    assert (encoder_pool(2).min_size, encoder_pool(2).max_size) == (2, 2)


@pytest.fixture
def dl19_slice(tmp_path, shared_datasets):
    """Five real DL19 queries with their BM25 top-20 passages and qrels, as an MS MARCO layout."""
    src = shared_datasets / "trec-dl-2019"
    run_lines = [ln for ln in (src / "runs" / "bm25.trec").read_text().splitlines()]
    queries = list(dict.fromkeys(ln.split()[0] for ln in run_lines))[:5]
    keep = [ln for ln in run_lines if ln.split()[0] in queries and int(ln.split()[3]) <= 20]
    docs = {ln.split()[2] for ln in keep}
    root = tmp_path / "dl19-slice"
    with gzip.open(src / "collection.tsv.gz", "rt", encoding="utf-8") as f:
        write_lines(root / "collection.tsv", [ln.rstrip("\n") for ln in f if ln.split("\t", 1)[0] in docs])
    write_lines(
        root / "queries.tsv",
        [ln for ln in (src / "queries.tsv").read_text().splitlines() if ln.split("\t")[0] in queries],
    )
    write_lines(
        root / "qrels.txt", [ln for ln in (src / "qrels.txt").read_text().splitlines() if ln.split()[0] in queries]
    )
    write_lines(root / "runs" / "bm25.trec", keep)
    return root, queries, docs


@pytest.mark.slow
def test_index_stage_end_to_end(ray_local, make_config, dl19_slice, capsys):
    from utilrag.data import ingest
    from utilrag.evaluate import run_evaluation
    from utilrag.index import run_index
    from utilrag.index.encode import Encoder, read_embeddings
    from utilrag.store import read_manifest

    root, queries, docs = dl19_slice
    cfg = make_config(
        {
            "ingest": {
                "datasets": [
                    {
                        "name": "slice",
                        "path": str(root),
                        "layout": "msmarco",
                        "relevance_threshold": 2,
                        "unknown_qrels_docs": "keep",
                    },
                    # the same queries without passages of their own (as DL19 / DL20 beside msmarco-passage)
                    {"name": "slice-q", "path": str(root), "layout": "msmarco", "queries_only": True},
                ]
            },
            "index": {
                "passage_max_len": 64,
                "batch_size": 16,
                "shards": 2,
                "rows_per_file": 25,
                "k": 20,
                "targets": [
                    {"dataset": "slice", "label": "minilm"},
                    {"dataset": "slice", "rerank": "bm25", "label": "minilm-rerank"},
                    {"dataset": "slice-q", "corpus": "slice", "label": "minilm"},
                ],
            },
            "evaluate": {
                "metrics": ["nDCG@10", "MRR@10"],
                "baseline": "bm25",
                "permutations": 200,
                "runs": [
                    {"dataset": "slice", "run": "bm25"},
                    {"dataset": "slice", "run": "minilm"},
                    {"dataset": "slice", "run": "minilm-rerank"},
                ],
            },
        }
    )
    ingested = ingest(cfg)
    # queries_only: queries, qrels and runs, no corpus; judged passages and run rows kept unchecked
    assert set(ingested["slice-q"].tables) == {"queries", "qrels", "runs"}
    assert ingested["slice-q"].tables["qrels"].rows == ingested["slice"].tables["qrels"].rows
    written = run_index(cfg)
    assert [reused for _, reused in written] == [False, False, False, False]  # embeddings (once), three runs
    assert len(list((Path(cfg.output_dir) / "index").glob("*/*/embeddings"))) == 1  # slice-q has none
    full, rerank, other = (pa.parquet.read_table(f"{folder}/run.parquet") for folder, _ in written[1:])
    assert written[3][0].endswith("dense/slice-q-all/minilm") and other.equals(full)  # slice's passages
    assert full.num_rows == 5 * 20 and set(full.column("doc_id").to_pylist()) <= docs
    assert rerank.num_rows == 5 * 20
    # Full retrieval (FAISS shards) and re-ranking (direct dot products) agree on every shared pair.
    full_scores = {(q, d): s for q, d, s in zip(*(full.column(c).to_pylist() for c in ["query_id", "doc_id", "score"]))}
    shared = [
        (q, d, s)
        for q, d, s in zip(*(rerank.column(c).to_pylist() for c in ["query_id", "doc_id", "score"]))
        if (q, d) in full_scores
    ]
    assert len(shared) >= 20
    assert all(abs(full_scores[(q, d)] - s) < 1e-4 for q, d, s in shared)
    # The Ray Data pipeline's embeddings equal the bare encoder's.
    emb_dir = next((cfg_out := __import__("pathlib").Path(cfg.output_dir) / "index" / "slice").glob("*/embeddings"))
    ids, vectors = read_embeddings(str(emb_dir / "parts"))
    from utilrag.data.tables import read_table

    corpus = read_table(cfg_out.parent.parent / "ingest" / "slice" / "corpus").to_pandas().set_index("doc_id")
    bare = Encoder("sentence-transformers/all-MiniLM-L6-v2", max_length=64)(list(corpus.loc[ids[:4], "text"]))
    np.testing.assert_allclose(vectors[:4], bare, atol=1e-5)
    # index.precision bf16 (autocast): the same directions to 4 decimals
    half = Encoder("sentence-transformers/all-MiniLM-L6-v2", max_length=64, dtype="bfloat16")(
        list(corpus.loc[ids[:4], "text"])
    )
    assert half.dtype == np.float32 and (np.sum(half * bare, axis=1) > 0.999).all()
    shards = read_manifest(emb_dir.parent / "faiss-flat-2shards")["shards"]
    assert sum(s["vectors"] for s in shards) == len(docs)
    rows = run_evaluation(cfg)
    by_label = {r["label"]: r for r in rows}
    assert 0 < by_label["minilm"]["nDCG@10"] <= 1 and 0 < by_label["minilm-rerank"]["nDCG@10"] <= 1
    printed = capsys.readouterr().out
    assert "Paired tests against 'bm25'" in printed and "| minilm | slice | nDCG@10 |" in printed
    # A second run reuses the embeddings and both runs; another k searches the saved shards again.
    assert [reused for _, reused in run_index(cfg)] == [True, True, True, True]
    assert "corpus embeddings unchanged" in capsys.readouterr().out
    cfg.index.k = 10
    again = {"/".join(folder.rsplit("/", 2)[-2:]): reused for folder, reused in run_index(cfg)}
    assert [f for f, reused in again.items() if not reused] == ["slice-all/minilm", "slice-q-all/minilm"]
    assert len(again) == 4 and again["sentence-transformers_all-MiniLM-L6-v2/embeddings"]
    assert "loaded 2 flat shard(s)" in capsys.readouterr().out


def test_torch_flat_index_equals_faiss_flat_and_saves_as_faiss():
    """The GPU fallback when faiss-gpu is absent (exercised on a GPU by benchmarks/gpu_check.py);
    here on CPU: same top-k as IndexFlatIP, -1 padding past ntotal, saved as a FAISS flat index."""
    import faiss

    from utilrag.index.torch_flat import TorchFlatIndex

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    index = TorchFlatIndex(16, device="cpu")
    index.add(docs[:300])
    index.add(docs[300:])
    flat = faiss.IndexFlatIP(16)
    flat.add(docs)
    t_scores, t_ids = index.search(queries, 10)
    f_scores, f_ids = flat.search(queries, 10)
    assert (t_ids == f_ids).all() and np.allclose(t_scores, f_scores, atol=1e-5)
    small = TorchFlatIndex(16, device="cpu")
    small.add(docs[:3])
    s_scores, s_ids = small.search(queries[:2], 5)
    assert (s_ids[:, 3:] == -1).all() and np.isneginf(s_scores[:, 3:]).all()
    saved = index.to_faiss()
    assert saved.ntotal == 500 and (saved.search(queries, 10)[1] == f_ids).all()
    assert index.memory_bytes() == 500 * 16 * 4


def test_trained_encoder_spec_index_embeddings_equal_the_training_encoders(ray_local, tmp_path):
    """A bi-encoder with last-token pooling, L2 normalisation and separate towers, saved as
    training saves it (HF folders + encoder_spec.json): the index stage's Ray Data encoder,
    configured with nothing but the model folder, reproduces the training-time embeddings."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from utilrag.config import IndexConfig
    from utilrag.encoder_spec import EncoderSpec, read_spec
    from utilrag.index.encode import encode_table, read_embeddings, resolve_encoder
    from utilrag.train.modeling import BiEncoder

    base = tmp_path / "base"
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=40,
            max_position_embeddings=64,
        )
    ).save_pretrained(base)
    words = [f"w{i}" for i in range(35)]
    (base / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(base / "vocab.txt"))
    tokenizer.save_pretrained(base)
    model = BiEncoder(str(base), pooling="last", normalize=True, shared=False).eval()
    with torch.no_grad():  # make the towers differ, so that a mix-up shows
        for p in model.passage_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = EncoderSpec(pooling="last", normalize=True, query_max_len=8, passage_max_len=12)
    trained = tmp_path / "trained"
    model.save(trained, tokenizer, spec=spec)
    assert read_spec(trained) == spec.model_copy(update={"shared": False})

    resolved, query_dir, passage_dir = resolve_encoder(IndexConfig(model=str(trained)))
    assert resolved.pooling == "last" and not resolved.shared and passage_dir.endswith("passage")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(2, 15)))) for _ in range(9)]  # some cut at max len
    for tower, folder, max_len in (("query", query_dir, 8), ("passage", passage_dir, 12)):
        out = tmp_path / f"{tower}-embeddings"
        encode_table(
            pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}),
            out,
            model=folder,
            pooling=resolved.pooling,
            normalize=resolved.normalize,
            max_length=max_len,
            batch_size=4,
            encoders=1,
            use_gpu=False,
            out_dtype="float32",
            rows_per_file=100,
            what=tower,
        )
        ids, got = read_embeddings(out)
        got = got[np.argsort([int(i) for i in ids])]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        encoder = model.query_encoder if tower == "query" else model.passage_encoder
        with torch.no_grad():
            want = model.encode(encoder, batch["input_ids"], batch["attention_mask"]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=tower)
    other = model.encode(model.query_encoder, batch["input_ids"], batch["attention_mask"]).detach().numpy()
    assert not np.allclose(got, other, atol=1e-3)  # the passage tower really differs from the query tower
