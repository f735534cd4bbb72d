"""Index stage: encode a corpus on a Ray Data actor pool, build a sharded FAISS index on Ray actors,
and write dense runs (full retrieval, or re-ranking of a candidate run) for evaluation.
BM25 (bm25s) lives here too."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from utilrag.config import IndexConfig, IndexTarget, PipelineConfig
from utilrag.data.ingest import IngestError, dataset_dir
from utilrag.data.tables import SCHEMAS, fingerprint, read_manifest, read_table, require_manifest, write_manifest
from utilrag.index.bm25 import run_bm25, split_queries, write_trec_run
from utilrag.index.encode import ModelError, encode_table, read_embeddings, resolve_encoder, texts_for
from utilrag.index.shards import ShardedIndex, ShardError

__all__ = ["run_bm25", "run_index", "dense_run_path", "ModelError", "ShardError"]


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/")).strip("_")[-80:]


def dense_run_path(output_dir: str, dataset: str, split: str | None, label: str) -> Path:
    return Path(output_dir) / "dense" / f"{dataset}-{split or 'all'}" / label / "run.parquet"


def encode_corpus(cfg: PipelineConfig, dataset: str, icfg: IndexConfig) -> tuple[Path, dict]:
    """Corpus embeddings under output_dir/index/<dataset>/<model>/embeddings (reused when unchanged)."""
    source = dataset_dir(cfg, dataset)
    out = Path(cfg.output_dir) / "index" / dataset / model_slug(icfg.model) / "embeddings"
    spec, _, passage_model = resolve_encoder(icfg)
    settings = {
        **icfg.model_dump(include={"model", "embedding_dtype", "rows_per_file"}),
        **spec.model_dump(include={"pooling", "normalize", "passage_prefix", "passage_max_len"}),
        "passage_model": passage_model,
    }
    fp = fingerprint({"input": require_manifest(source, "index: dataset")["input_fingerprint"], "encode": settings})
    old = read_manifest(out)
    if old and old.get("input_fingerprint") == fp:
        print(f"[index] {dataset}: corpus embeddings unchanged, reusing {out}", flush=True)
        return out, old["encode"]
    corpus = read_table(source / "corpus")
    if corpus.num_rows == 0:
        raise ShardError(f"{dataset}: the corpus is empty; nothing to index")
    stats = encode_table(
        texts_for(corpus, "doc_id", spec.passage_prefix),
        out,
        model=passage_model,
        pooling=spec.pooling,
        normalize=spec.normalize,
        max_length=spec.passage_max_len,
        batch_size=icfg.batch_size,
        encoders=icfg.encoders,
        max_encoders=icfg.max_encoders,
        use_gpu=icfg.use_gpu,
        out_dtype=icfg.embedding_dtype,
        rows_per_file=icfg.rows_per_file,
        what=f"{dataset} corpus",
    )
    write_manifest(out, stage="index/encode", dataset=dataset, input_fingerprint=fp, encode=stats, config=settings)
    return out, stats


def encode_queries(
    cfg: PipelineConfig, target: IndexTarget, icfg: IndexConfig, out: Path
) -> tuple[list[str], np.ndarray]:
    qids, texts = split_queries(cfg, target.dataset, target.split)
    if not qids:
        raise IngestError(f"{target.dataset}/{target.split}: no queries to search")
    spec, query_model, _ = resolve_encoder(icfg)
    table = pa.table({"id": qids, "text": [spec.query_prefix + t for t in texts]})
    encode_table(
        table,
        out,
        model=query_model,
        pooling=spec.pooling,
        normalize=spec.normalize,
        max_length=spec.query_max_len,
        batch_size=icfg.batch_size,
        encoders=icfg.encoders,
        max_encoders=icfg.max_encoders,
        use_gpu=icfg.use_gpu,
        out_dtype="float32",
        rows_per_file=10**9,
        what=f"{target.dataset}/{target.split or 'all'} queries",
    )
    ids, vectors = read_embeddings(out)
    order = {q: i for i, q in enumerate(ids)}
    return qids, vectors[[order[q] for q in qids]]


def rerank_run(
    cfg: PipelineConfig, target: IndexTarget, qids: list[str], queries: np.ndarray, embeddings_dir: Path
) -> pa.Table:
    """Score only the candidates of an ingested run with the encoder (e.g. DL19's top-100)."""
    runs = read_table(dataset_dir(cfg, target.dataset) / "runs")
    candidates = runs.filter(pc.equal(runs.column("run"), target.rerank))
    if candidates.num_rows == 0:
        raise IngestError(f"rerank: run {target.rerank!r} is not an ingested run of {target.dataset!r}")
    doc_ids, doc_vectors = read_embeddings(embeddings_dir)
    row_of = {d: i for i, d in enumerate(doc_ids)}
    q_row = {q: i for i, q in enumerate(qids)}
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMAS["runs"].names}
    by_query: dict[str, list[str]] = {}
    for q, d in zip(candidates.column("query_id").to_pylist(), candidates.column("doc_id").to_pylist()):
        by_query.setdefault(q, []).append(d)
    for q, docs in by_query.items():
        if q not in q_row:
            continue
        docs = [d for d in docs if d in row_of]
        scores = doc_vectors[[row_of[d] for d in docs]].astype(np.float32) @ queries[q_row[q]]
        for rank, i in enumerate(np.argsort(-scores, kind="stable"), start=1):
            rows["query_id"].append(q)
            rows["doc_id"].append(docs[i])
            rows["rank"].append(rank)
            rows["score"].append(float(scores[i]))
            rows["run"].append(target.label or f"dense-rerank-{target.rerank}")
    return pa.table(rows, schema=SCHEMAS["runs"])


def build_or_load_index(
    cfg: PipelineConfig, dataset: str, icfg: IndexConfig, embeddings_dir: Path, dim: int
) -> ShardedIndex:
    folder = embeddings_dir.parent / f"faiss-{icfg.index_type}-{icfg.shards}shards"
    settings = icfg.model_dump(include={"index_type", "shards", "nlist", "pq_m", "hnsw_m"})
    if icfg.use_gpu and icfg.gpu_fp16 and icfg.index_type == "ivf_flat":
        settings["storage"] = "ivf_sq_fp16"  # a different saved index (other settings keep their fingerprint)
    fp = fingerprint(
        {"embeddings": require_manifest(embeddings_dir, "index: embeddings")["input_fingerprint"], "index": settings}
    )
    index = ShardedIndex(
        icfg.shards,
        icfg.threads_per_shard,
        icfg.use_gpu,
        icfg.gpu_fp16,
        icfg.search_retries,
        icfg.cpus_per_shard,
        icfg.shard_start_timeout_s,
        index_type=icfg.index_type,
    )
    old = read_manifest(folder)
    t0 = time.time()
    if old and old.get("input_fingerprint") == fp:
        index.load(str(folder))
        print(f"[index] {dataset}: loaded {icfg.shards} {icfg.index_type} shard(s) from {folder}", flush=True)
        return index
    files = [str(p) for p in sorted(embeddings_dir.glob("part-*.parquet"))]
    stats = index.build(files, icfg.index_type, icfg.nlist, icfg.pq_m, icfg.hnsw_m, expected_dim=dim)
    index.save(str(folder))
    write_manifest(
        folder,
        stage="index/faiss",
        dataset=dataset,
        input_fingerprint=fp,
        config=settings,
        shards=stats,
        wall_time_s=round(time.time() - t0, 2),
    )
    for s in stats:
        print(
            f"[index] {dataset}: shard {s['shard']}: {s['vectors']:,} vectors x {s['dim']}, "
            f"{s['bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
    return index


def run_index(cfg: PipelineConfig) -> list[Path]:
    """Per dataset: encode the corpus and the targets' queries (Ray Data actor pool), then build or
    load the sharded index, search, and write one dense run per target. A dataset's shard actors
    are released before the next dataset's encoders need the CPUs."""
    from utilrag.raycluster import connect

    connect(cfg.ray)
    icfg, written = cfg.index, []
    datasets = list(dict.fromkeys(t.dataset for t in icfg.targets))
    for dataset in datasets:
        targets = [t for t in icfg.targets if t.dataset == dataset]
        embeddings_dir, _ = encode_corpus(cfg, dataset, icfg)
        planned = []
        for target in targets:
            label = target.label or (f"dense-rerank-{target.rerank}" if target.rerank else "dense")
            run_path = dense_run_path(cfg.output_dir, dataset, target.split, label)
            qids, queries = encode_queries(cfg, target, icfg, run_path.parent / "query_embeddings")
            planned.append((target, label, run_path, qids, queries))
        index = None
        try:
            for target, label, run_path, qids, queries in planned:
                t0 = time.time()
                if target.rerank:
                    run = rerank_run(cfg, target, qids, queries, embeddings_dir)
                else:
                    if index is None:
                        dim = require_manifest(embeddings_dir, "index: embeddings")["encode"]["dim"]
                        index = build_or_load_index(cfg, dataset, icfg, embeddings_dir, dim)
                        index.set_search_params(icfg.nprobe, icfg.ef_search)
                    run = dense_search_run(index, qids, queries, icfg.k, label)
                pq.write_table(run, run_path)
                write_trec_run(run, run_path.with_suffix(".trec"))
                write_manifest(
                    run_path.parent,
                    stage="index/search",
                    target=target.model_dump(),
                    model=icfg.model,
                    index_type=None if target.rerank else icfg.index_type,
                    rows={"runs": run.num_rows, "queries": len(qids)},
                    wall_time_s=round(time.time() - t0, 2),
                )
                print(
                    f"[index] {dataset}/{target.split or 'all'}: run {label!r}: {len(qids):,} queries, "
                    f"{run.num_rows:,} results in {time.time() - t0:.1f}s -> {run_path.parent}",
                    flush=True,
                )
                written.append(run_path)
        finally:
            if index is not None:
                index.close()
    return written


def dense_search_run(index: ShardedIndex, qids: list[str], queries: np.ndarray, k: int, label: str) -> pa.Table:
    scores, doc_ids = index.search(queries, k)
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMAS["runs"].names}
    for q, docs, row in zip(qids, doc_ids, scores):
        for rank, (d, s) in enumerate(zip(docs, row), start=1):
            columns["query_id"].append(q)
            columns["doc_id"].append(d)
            columns["rank"].append(rank)
            columns["score"].append(float(s))
            columns["run"].append(label)
    return pa.table(columns, schema=SCHEMAS["runs"])
