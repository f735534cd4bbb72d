"""Index stage: encode a corpus on a Ray Data actor pool, build a sharded FAISS index on Ray actors,
and write dense runs (full retrieval, or re-ranking of a candidate run) for evaluation.
The BM25 stage (``index.bm25``) lives beside it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from utilrag import store
from utilrag.config import TRAINED_MODEL, IndexConfig, IndexTarget, PipelineConfig
from utilrag.data.dataset import Dataset, DatasetInputError, open_dataset
from utilrag.data.formats import list_files
from utilrag.data.lexical import write_trec_run
from utilrag.data.tables import SCHEMAS, fingerprint, write_table
from utilrag.encoder_spec import ModelError, model_identity
from utilrag.index.encode import (
    SPEC_FIELDS,
    compute_dtype,
    default_dtype,
    encode_table,
    read_embeddings,
    resolve_encoder,
    texts_for,
)
from utilrag.index.shards import ShardedIndex, ShardError
from utilrag.logs import get_logger
from utilrag.plan import index_targets
from utilrag.stages import StageResult
from utilrag.store import Committed, Store
from utilrag.summaries import IndexSummary

__all__ = ["run", "run_index", "ModelError", "ShardError"]

log = get_logger("index")


def encode_corpus(
    cfg: PipelineConfig, dataset: Dataset, icfg: IndexConfig, folder_name: str | None = None
) -> tuple[Committed, bool]:
    """Corpus embeddings under output_dir/index/<dataset>/<model>/embeddings (reused when unchanged);
    ``folder_name`` names <model> (a trained retriever's train:<name>, not its path)."""
    out = Store(cfg.output_dir).embeddings(dataset.name, folder_name or icfg.model)
    spec, _, passage_model = resolve_encoder(icfg)
    settings = {
        **icfg.model_dump(include={"model", "embedding_dtype", "rows_per_file", "use_gpu"}),  # GPU encodes in fp16
        **spec.model_dump(include={"pooling", "normalize", "passage_prefix", "passage_max_len"}),
        "passage_model": model_identity(passage_model),
        **precision_setting(icfg),
    }
    fp = fingerprint({"input": dataset.corpus_fingerprint, "encode": settings})
    old = store.reusable(out, fp)
    if old is not None:
        log.info(f"{dataset.name}: corpus embeddings unchanged, reusing {out}")
        return old, True
    corpus = dataset.table("corpus")
    if corpus.num_rows == 0:
        raise ShardError(
            f"{dataset.name}: no passages to index (ingested queries_only? name the dataset with the passages as "
            "the index target's corpus)"
        )
    writer = store.begin(out, "index/encode", fp, dataset=dataset.name)
    stats = encode_table(
        texts_for(corpus, "doc_id", spec.passage_prefix),
        writer.path("parts"),
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
        what=f"{dataset.name} corpus",
        dtype=compute_dtype(icfg),
    )
    return writer.commit(**IndexSummary(encode=stats, config=settings).manifest()), False


def precision_setting(icfg: IndexConfig) -> dict:
    """In a fingerprint only when it differs from the default arithmetic, so that earlier runs stay reusable."""
    dtype = compute_dtype(icfg)
    return {} if dtype == default_dtype(icfg.use_gpu) else {"compute_dtype": dtype}


def query_settings(icfg: IndexConfig) -> dict:
    spec, query_model, _ = resolve_encoder(icfg)
    return {
        **spec.model_dump(include={"pooling", "normalize", "query_prefix", "query_max_len"}),
        "model": model_identity(query_model),
        "use_gpu": icfg.use_gpu,
        **precision_setting(icfg),
    }


def encode_queries(
    qids: list[str], texts: list[str], target: IndexTarget, icfg: IndexConfig, out: str
) -> tuple[list[str], np.ndarray]:
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
        dtype=compute_dtype(icfg),
    )
    ids, vectors = read_embeddings(out)
    order = {q: i for i, q in enumerate(ids)}
    return qids, vectors[[order[q] for q in qids]]


def rerank_run(
    dataset: Dataset, target: IndexTarget, qids: list[str], queries: np.ndarray, embeddings: Committed
) -> pa.Table:
    """Score only the candidates of an ingested run with the encoder (e.g. DL19's top-100)."""
    assert target.rerank is not None
    candidates = dataset.run(target.rerank)
    doc_ids, doc_vectors = read_embeddings(embeddings.path("parts"))
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


def faiss_settings(icfg: IndexConfig) -> dict:
    settings = icfg.model_dump(include={"index_type", "shards", "nlist", "pq_m", "hnsw_m"})
    if icfg.use_gpu and icfg.gpu_fp16 and icfg.index_type == "ivf_flat":
        settings["storage"] = "ivf_sq_fp16"  # a different saved index (other settings keep their fingerprint)
    return settings


def search_settings(icfg: IndexConfig) -> dict:
    """What changes a dense run's scores beyond the saved index: fp16 storage (flat) or lookup
    tables (ivf_pq) on the GPU, and the search parameters."""
    return {
        "faiss": faiss_settings(icfg),
        **icfg.model_dump(include={"k", "nprobe", "ef_search"}),
        "gpu_fp16": icfg.use_gpu and icfg.gpu_fp16,
    }


def build_or_load_index(
    cfg: PipelineConfig, dataset: str, icfg: IndexConfig, embeddings: Committed, folder_name: str | None = None
) -> ShardedIndex:
    parts = embeddings.path("parts")
    files = [f for f in list_files(parts) if f.endswith(".parquet")]
    if 0 < len(files) < icfg.shards:  # a shard takes whole parts: a small corpus gets fewer shards, not an error
        log.info(f"{dataset}: {len(files)} embedding part(s) for {icfg.shards} shards: {len(files)} shard(s)")
        icfg = icfg.model_copy(update={"shards": len(files)})
    folder = Store(cfg.output_dir).faiss(dataset, folder_name or icfg.model, icfg.index_type, icfg.shards)
    settings = faiss_settings(icfg)
    fp = fingerprint({"embeddings": embeddings["input_fingerprint"], "index": settings})
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
    old = store.reusable(folder, fp)
    t0 = time.time()
    if old is not None:
        index.load(old.path("shards"))
        log.info(f"{dataset}: loaded {icfg.shards} {icfg.index_type} shard(s) from {folder}")
        return index
    writer = store.begin(folder, "index/faiss", fp, dataset=dataset)
    stats = index.build(
        files, icfg.index_type, icfg.nlist, icfg.pq_m, icfg.hnsw_m, expected_dim=embeddings["encode"]["dim"]
    )
    index.save(writer.path("shards"))
    writer.commit(**IndexSummary(config=settings, shards=stats, wall_time_s=round(time.time() - t0, 2)).manifest())
    index.saved_to = writer.committed.path("shards") if writer.committed else index.saved_to
    for s in stats:
        log.info(f"{dataset}: shard {s['shard']}: {s['vectors']:,} vectors x {s['dim']}, {s['bytes'] / 2**20:.1f} MiB")
    return index


def target_label(target: IndexTarget) -> str:
    return target.run_label()


def target_fingerprint(
    icfg: IndexConfig, target: IndexTarget, embeddings: Committed, queried: Dataset | None = None
) -> str:
    """``queried``: the dataset whose queries are searched when it is not the corpus's (its own queries
    are in the embeddings' input already)."""
    search = {"rerank": target.rerank} if target.rerank else search_settings(icfg)
    other = target.corpus_name() != target.dataset
    return fingerprint(
        {
            "embeddings": embeddings["input_fingerprint"],
            **({"queried": queried.fingerprint} if other and queried is not None else {}),
            "queries": query_settings(icfg),
            # corpus only when another dataset's: the runs of targets written before it existed stay reusable
            "target": target.model_dump(exclude=set() if other else {"corpus"}),
            "search": search,
        }
    )


def with_model(cfg: PipelineConfig, model: str | None) -> IndexConfig:
    """The index settings for one target's encoder: index.model (null), another model, or a retriever
    the train stage fitted (train:<name>), encoded as it was trained: its saved encoder spec, not the
    index section's pooling and lengths (those are for index.model)."""
    icfg = cfg.index
    if model is None:
        return icfg
    if model.startswith(TRAINED_MODEL):
        trained = store.join(Store(cfg.output_dir).train(model[len(TRAINED_MODEL) :]), "model")
        return icfg.model_copy(update={"model": trained, **dict.fromkeys(SPEC_FIELDS)})
    return icfg.model_copy(update={"model": model})


def run_index(cfg: PipelineConfig, targets: list[IndexTarget] | None = None) -> list[tuple[str, bool]]:
    """Per corpus and encoder: encode the corpus (once, shared by every target naming it) and the queries
    of every target whose run changed (Ray Data actor pool), then build or load the sharded index, search,
    and write one dense run per target under dense/<dataset>-<split>/<label>/. Shard actors start only
    after the encoders are done, and one index's shards are released before the next one's encoders need
    the CPUs."""
    written = []
    if targets is None:
        targets = index_targets(cfg)  # as written, and each train setting's searches (utilrag.plan)
    for name, model in dict.fromkeys((t.corpus_name(), t.model) for t in targets):
        icfg = with_model(cfg, model)
        dataset = open_dataset(cfg, name)
        embeddings, reused = encode_corpus(cfg, dataset, icfg, model)
        written.append((embeddings.folder, reused))
        planned = []
        for target in (t for t in targets if t.corpus_name() == name and t.model == model):
            label = target_label(target)
            queried = dataset if target.dataset == name else open_dataset(cfg, target.dataset)
            out = Store(cfg.output_dir).dense_run(target.dataset, target.split, label)
            fp = target_fingerprint(icfg, target, embeddings, queried)
            if store.reusable(out, fp) is not None:
                log.info(f"{target.dataset}/{target.split or 'all'}: run {label!r} unchanged, reusing {out}")
                written.append((out, True))
                continue
            qids, texts = queried.split_queries(target.split)
            if not qids:  # before begin: a mistake keeps the old run
                raise DatasetInputError(f"{target.dataset}/{target.split}: no queries to search")
            writer = store.begin(out, "index/search", fp, dataset=target.dataset)
            qids, queries = encode_queries(qids, texts, target, icfg, writer.path("query_embeddings"))
            planned.append((target, queried, label, writer, qids, queries))
        index = None
        try:
            for target, queried, label, writer, qids, queries in planned:
                t0 = time.time()
                if target.rerank:
                    run = rerank_run(queried, target, qids, queries, embeddings)
                else:
                    if index is None:
                        index = build_or_load_index(cfg, name, icfg, embeddings, model)
                        index.set_search_params(icfg.nprobe, icfg.ef_search)
                    run = dense_search_run(index, qids, queries, target.k or icfg.k, label)
                write_table(run, writer.path("run.parquet"))
                write_trec_run(run, writer.path("run.trec"))
                summary = IndexSummary(
                    target=target.model_dump(mode="json"),
                    model=icfg.model,
                    index_type=None if target.rerank else icfg.index_type,
                    rows={"runs": run.num_rows, "queries": len(qids)},
                    wall_time_s=round(time.time() - t0, 2),
                )
                writer.commit(**summary.manifest())
                log.info(
                    f"{target.dataset}/{target.split or 'all'}: run {label!r}: {len(qids):,} queries, "
                    f"{run.num_rows:,} results in {time.time() - t0:.1f}s -> {writer.folder}"
                )
                written.append((writer.folder, False))
        finally:
            if index is not None:
                index.close()
    return written


def run(cfg: PipelineConfig) -> StageResult:
    """The index stage."""
    from utilrag.raycluster import connect

    t0 = time.time()
    connect(cfg.ray)
    written = run_index(cfg)
    return StageResult("index", [o for o, _ in written], reused=sum(r for _, r in written), wall_s=time.time() - t0)


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
