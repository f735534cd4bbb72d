"""Index benchmark: sharded search on Ray actors vs one process, IVF recall vs Flat, encode docs/s.

    python benchmarks/index_search.py [--quick] [--shards 2] [--docs 200000]

Figures (last line, one JSON object):
- shard_efficiency: search QPS of N shard actors (1 FAISS thread each) / QPS of one process
  holding one Flat index with N threads; same vectors, same query batches (goal >= 0.9).
- ivf_recall: recall@100 of IVF-Flat at the configured nprobe against Flat, on real embeddings
  (SciFact, all-MiniLM-L6-v2, encoded here through the Ray Data pipeline).
- encode_docs_per_s: the Ray Data encoding pipeline on this machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))


def qps(search, queries: np.ndarray, k: int, repeats: int) -> float:
    search(queries[:10], k)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        search(queries, k)
    return repeats * len(queries) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; under 5 minutes on 2 cores")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--docs", type=int, default=None, help="synthetic vectors for the QPS comparison")
    parser.add_argument("--encode-docs", type=int, default=None, help="SciFact docs encoded for the recall figure")
    parser.add_argument("--nlist", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=8)
    args = parser.parse_args()
    n_docs = args.docs or (100_000 if args.quick else 500_000)
    n_encode = args.encode_docs or (600 if args.quick else 5183)

    import faiss
    import ray

    from utilrag.config import DatasetConfig, resolve_data_root
    from utilrag.data import registry
    from utilrag.data.formats import parse_file
    from utilrag.index.encode import encode_table, read_embeddings, texts_for
    from utilrag.index.shards import ShardedIndex, make_faiss_index
    from utilrag.raycluster import quiet_ray_data

    ray.init(num_cpus=args.shards, include_dashboard=False, logging_level="WARNING")
    quiet_ray_data()
    dim, k = 384, 100
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((n_docs, dim)).astype(np.float32)
    queries = rng.standard_normal((256, dim)).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        # 1. N shard actors vs one process with N threads, Flat-IP over the same vectors.
        from utilrag.data.tables import ParquetParts
        import pyarrow as pa

        schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
        parts = ParquetParts(Path(tmp) / "emb", schema, rows_per_file=n_docs // (4 * args.shards))
        flat_values = pa.array(docs.reshape(-1))
        parts.write(pa.table({"id": [str(i) for i in range(n_docs)],
                              "embedding": pa.FixedSizeListArray.from_arrays(flat_values, dim)}))
        parts.close()
        files = [str(p) for p in sorted((Path(tmp) / "emb").glob("part-*.parquet"))]
        sharded = ShardedIndex(args.shards, threads_per_shard=1)
        build = sharded.build(files, "flat")
        repeats = 3 if args.quick else 10
        sharded_qps = qps(sharded.search, queries, k, repeats)
        sharded.close()
        faiss.omp_set_num_threads(args.shards)
        single = faiss.IndexFlatIP(dim)
        single.add(docs)
        single_qps = qps(single.search, queries, k, repeats)
        del single

        # 2. Real embeddings: SciFact through the Ray Data encoder; IVF recall@100 vs Flat.
        data_root = resolve_data_root(None)
        resolved = registry.resolve(DatasetConfig(name="scifact"), data_root, allow_download=False)
        corpus_file = next(j for j in resolved.jobs if j.table == "corpus")
        import pyarrow as pa

        corpus = pa.concat_tables(parse_file(corpus_file.uri, "corpus", corpus_file.parser, {}))
        corpus = corpus.filter(corpus.column("_reason").is_null()).slice(0, n_encode)
        enc = encode_table(texts_for(corpus, "doc_id"), Path(tmp) / "real", model="sentence-transformers/all-MiniLM-L6-v2",
                           pooling="mean", normalize=True, max_length=256, batch_size=32, encoders=1, use_gpu=False,
                           out_dtype="float32", rows_per_file=10**9, what="scifact sample")
        _, real = read_embeddings(Path(tmp) / "real")
        real_queries = real[rng.choice(len(real), size=min(200, len(real)), replace=False)]
        real_queries = real_queries + 0.05 * rng.standard_normal(real_queries.shape).astype(np.float32)
        flat = faiss.IndexFlatIP(real.shape[1])
        flat.add(real)
        _, exact = flat.search(real_queries, k)
        ivf = make_faiss_index("ivf_flat", real.shape[1], len(real), args.nlist, 16, 32)
        ivf.train(real)
        ivf.add(real)
        ivf.nprobe = args.nprobe
        _, approx = ivf.search(real_queries, k)
        recall = float(np.mean([len(set(a) & set(e) - {-1}) / len(set(e) - {-1}) for a, e in zip(approx, exact)]))

    result = {
        "shards": args.shards, "docs": n_docs, "dim": dim, "k": k, "query_batch": len(queries),
        "sharded_qps": round(sharded_qps, 1), "single_process_qps": round(single_qps, 1),
        "shard_efficiency": round(sharded_qps / single_qps, 3),
        "shard_mib": [round(s["bytes"] / 2**20, 1) for s in build],
        "ivf_recall": round(recall, 4), "ivf_nlist": ivf.nlist, "ivf_nprobe": args.nprobe, "ivf_docs": len(real),
        "encode_docs_per_s": enc["per_second"], "encoded_docs": enc["rows"],
        "msmarco_flat_fp32_gib": round(8_841_823 * 768 * 4 / 2**30, 1),
    }
    print(f"sharded {sharded_qps:.0f} q/s vs one process {single_qps:.0f} q/s; IVF recall@{k} {recall:.3f}; "
          f"encode {enc['per_second']} docs/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
