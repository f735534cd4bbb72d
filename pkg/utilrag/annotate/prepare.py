"""Job A: the annotation inputs, one row per query, built by Ray Data workers (the driver holds counters).

pools (one row per query and pool passage) and the corpus are joined and grouped per query by a
shuffle through Parquet files, all of it in Ray Data tasks:

1. the corpus (passages cut to ``passage_words``) and the pools are written into ``B`` buckets by a
   hash of the doc id; the queries' texts into ``C`` buckets by a hash of the query id;
2. doc bucket ``k``: its pool rows joined with its passages, written into the ``C`` query buckets;
3. query bucket ``j``: its rows grouped per query into ``inputs/part-<j>.parquet`` (INPUT_SCHEMA).

Every step is a map over files or bucket numbers, so a task's memory is one bucket, whatever the
number of queries. The whole job is redone if it did not finish (its files are not resumed).

A job of one bucket each way (<= 250,000 passages, <= ~1,000 queries: a subset, a small corpus) is one
Ray task doing the same join on a CPU node: five Ray Data executions cost it a minute on a fresh
cluster (8 queries: 64 s, and 30+ pending tasks that made autoscaler v1 launch GPU-type nodes).
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from utilrag import store
from utilrag.annotate import prompts
from utilrag.config import AnnotateConfig

# One row per query. ``annotate`` is false for a rejected query (no text, < 2 passages to show):
# its rejects are kept, nothing is sent to the LLM. ``doc_ids`` / ``passages`` / ``cut``: what the LLM
# is shown, in pool order; ``all_pool`` / ``human`` / ``judged`` + ``judged_grades``: what the labels need.
INPUT_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("part", pa.int32()),
        ("annotate", pa.bool_()),
        ("query", pa.string()),
        ("doc_ids", pa.list_(pa.string())),
        ("passages", pa.list_(pa.string())),
        ("cut", pa.list_(pa.bool_())),
        ("all_pool", pa.list_(pa.string())),
        ("human", pa.list_(pa.string())),
        ("judged", pa.list_(pa.string())),
        ("judged_grades", pa.list_(pa.int32())),
        ("rejects", pa.list_(pa.struct([("doc_id", pa.string()), ("reason", pa.string())]))),
    ]
)
PASSAGE_SCHEMA = pa.schema([("doc_id", pa.string()), ("passage", pa.string()), ("was_cut", pa.bool_())])
POOL_COLUMNS = ["query_id", "doc_id", "position", "source", "human_grade"]
DOCS_PER_BUCKET = 250_000  # corpus rows per doc bucket: a bucket join holds one in memory
POOL_ROWS_PER_PART = 32_000  # pool rows per query bucket (~1,000 queries of 31): one input file each


# --------------------------------------------------------------------------- pure functions (one batch)
def bucket_of(values: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """A stable bucket per string (pandas' fixed-key hash): the same id lands in the same bucket in
    every task and every run."""
    import pandas as pd

    strings = np.asarray(pc.cast(values, pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    return (pd.util.hash_array(strings) % np.uint64(buckets)).astype(np.int64)


def split_by_bucket(table: pa.Table, key: str, buckets: int) -> Iterable[tuple[int, pa.Table]]:
    """(bucket, rows) for every non-empty bucket of ``table`` by ``key``."""
    if table.num_rows == 0:
        return
    index = bucket_of(table.column(key), buckets)
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    starts = np.flatnonzero(np.r_[True, sorted_index[1:] != sorted_index[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts, ends):
        yield int(sorted_index[start]), table.take(pa.array(order[start:end]))


def passage_text(title: str | None, text: str | None) -> str:
    return " ".join(part.strip() for part in (title, text) if part and part.strip())


def cut_passages(corpus: pa.Table, passage_words: int) -> pa.Table:
    """doc_id, title, text -> doc_id, passage (cut to ``passage_words``), was_cut."""
    max_chars = passage_words * 30  # a "word" of a megabyte is not a word
    passages, cut = [], []
    titles = corpus.column("title").to_pylist() if "title" in corpus.column_names else [None] * corpus.num_rows
    for title, text in zip(titles, corpus.column("text").to_pylist()):
        short, was_cut = prompts.cut_words(passage_text(title, text), passage_words)
        if len(short) > max_chars:
            short, was_cut = short[:max_chars], True
        passages.append(short)
        cut.append(was_cut)
    return pa.table(
        {"doc_id": pc.cast(corpus.column("doc_id"), pa.string()), "passage": passages, "was_cut": cut},
        schema=PASSAGE_SCHEMA,
    )


def join_passages(pools: pa.Table, passages: pa.Table) -> pa.Table:
    """Pool rows with their passage (null: not in the corpus)."""
    return pools.join(passages, keys="doc_id", join_type="left outer")


def query_rows(rows: pa.Table, texts: dict[str, str], part: int, acfg: AnnotateConfig) -> pa.Table:
    """Pool rows (with passages) of some queries -> one INPUT_SCHEMA row per query, with bad input
    counted as rejects: a pool of < 2 passages or without query text is not annotated; an empty or
    missing passage is left out of the prompts (a negative)."""
    rows = rows.sort_by([("query_id", "ascending"), ("position", "ascending")])
    cols = {c: rows.column(c).to_pylist() for c in [*POOL_COLUMNS, "passage", "was_cut"]}
    out: dict[str, list[Any]] = {name: [] for name in INPUT_SCHEMA.names}
    n = rows.num_rows
    start = 0
    while start < n:
        q = cols["query_id"][start]
        end = start
        while end < n and cols["query_id"][end] == q:
            end += 1
        _query_row(out, q, {c: v[start:end] for c, v in cols.items()}, texts.get(q), part, acfg)
        start = end
    return pa.table(out, schema=INPUT_SCHEMA)


def _query_row(out: dict, q: str, entries: dict, text: str | None, part: int, acfg: AnnotateConfig) -> None:
    pool, sources, grades = entries["doc_id"], entries["source"], entries["human_grade"]
    human = [d for d, s in zip(pool, sources) if s == "human"]
    rejects: list[dict] = []
    shown, passages, cut = [], [], []
    query = (text or "").strip()
    if not query:
        rejects.append({"doc_id": "", "reason": "missing query text"})
    else:
        for d, source, passage, was_cut in zip(pool, sources, entries["passage"], entries["was_cut"]):
            if acfg.human_positive == "exclusion" and source == "human":
                continue  # Exclusion: the human positive is removed from the pool
            if not passage:
                reason = "empty passage" if passage is not None else "passage not in the corpus"
                rejects.append({"doc_id": d, "reason": reason})
                continue
            shown.append(d)
            passages.append(passage)
            cut.append(bool(was_cut))
        if len(shown) < 2:
            rejects.append({"doc_id": "", "reason": f"pool has {len(shown)} passage(s) to show (< 2)"})
    annotate = bool(query) and len(shown) >= 2
    values = {
        "query_id": q,
        "part": part,
        "annotate": annotate,
        "query": query,
        "doc_ids": shown if annotate else [],
        "passages": passages if annotate else [],
        "cut": cut if annotate else [],
        "all_pool": list(pool),
        "human": human,
        "judged": [d for d, g in zip(pool, grades) if g is not None],
        "judged_grades": [g for g in grades if g is not None],
        "rejects": rejects,
    }
    for name in INPUT_SCHEMA.names:
        out[name].append(values[name])


def prepare_local(
    pools: pa.Table, queries: pa.Table, corpus: pa.Table, acfg: AnnotateConfig, wanted: list[str] | None = None
) -> pa.Table:
    """The same rows as the Ray job, in this process (tests and small tables)."""
    if wanted is not None:
        pools = pools.filter(pc.is_in(pools.column("query_id"), pa.array(wanted, pa.string())))
    joined = join_passages(pools.select(POOL_COLUMNS), cut_passages(corpus, acfg.passage_words))
    texts = dict(zip(queries.column("query_id").to_pylist(), queries.column("text").to_pylist()))
    return query_rows(joined, texts, 0, acfg)


def parquet_files(location: str) -> list[str]:
    """The Parquet files of a folder (not the temporary ones), sorted, as locations; a file: itself."""
    if location.endswith(".parquet") and store.is_file(location):  # a folder costs no extra round trip
        return [location]
    return sorted(
        store.join(location, n)
        for n in store.list_names(location)
        if n.endswith(".parquet") and not n.startswith((".", "_"))
    )


def _read_files(batch: pa.Table, *, columns: list[str]) -> Iterable[pa.Table]:
    """The files' rows, a row group at a time (an ingested corpus file holds up to a million rows)."""
    for location in batch.column("path").to_pylist():
        fs, path = store.filesystem(location)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                yield parquet.read_row_group(group, columns=columns)


def read_parquet_tasks(locations: str | list[str], columns: list[str]) -> Any:
    """Parquet files (a folder, a file, or a list of files) as a Ray Data dataset read by map tasks,
    one file per task. Not ray.data.read_parquet: it reads the files' footers on a pool of its own
    actors (FooterReader) that carry no label selector, so on a cluster with labelled node types
    autoscaler v2 places them on a GPU-type node once the CPU type is full (benchmarks/rehearsal.py
    saw one GPU node launched for them), and v1 removed their node mid-read at short idle timeouts
    (ActorDiedError: FooterReader). Map tasks carry the driver's label selector (CPU nodes)."""
    import ray

    files = parquet_files(locations) if isinstance(locations, str) else list(locations)
    ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
    return ds.map_batches(udf(_read_files), batch_size=1, batch_format="pyarrow", fn_kwargs={"columns": columns})


# --------------------------------------------------------------------------- the Ray job
def _write(table: pa.Table, location: str) -> None:
    fs, path = store.filesystem(location)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs)


def _read_folder(location: str, columns: list[str] | None = None) -> pa.Table | None:
    if not store.exists(location):
        return None
    fs, path = store.filesystem(location)
    table = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=columns)
    return table if table.num_rows else None


def _stats(n: int) -> dict[str, np.ndarray]:
    return {"rows": np.array([n], dtype=np.int64)}


def batch_name(batch: pa.Table) -> str:
    """A name from the batch's content: a retried task rewrites its own files instead of adding copies."""
    import pandas as pd

    digest = hashlib.sha1(str(batch.num_rows).encode())
    for column in batch.column_names[:2]:
        values = np.asarray(pc.cast(batch.column(column), pa.string()).to_numpy(zero_copy_only=False), dtype=object)
        digest.update(pd.util.hash_array(values).tobytes())
    return digest.hexdigest()[:20]


def _bucket_batch(batch: pa.Table, *, key: str, buckets: int, folder: str, name: str) -> dict[str, np.ndarray]:
    batch_id = batch_name(batch)
    for k, rows in split_by_bucket(batch, key, buckets):
        _write(rows, store.join(folder, f"{name}-{k}", f"{batch_id}.parquet"))
    return _stats(batch.num_rows)


def _bucket_corpus(batch: pa.Table, *, passage_words: int, **kw) -> dict[str, np.ndarray]:
    return _bucket_batch(cut_passages(batch, passage_words), **kw)


def _bucket_pools(batch: pa.Table, *, wanted: list[str] | None, **kw) -> dict[str, np.ndarray]:
    batch = batch.select(POOL_COLUMNS)
    for key in ("query_id", "doc_id"):  # the join and the buckets compare plain strings
        batch = batch.set_column(batch.schema.get_field_index(key), key, pc.cast(batch.column(key), pa.string()))
    if wanted is not None:
        batch = batch.filter(pc.is_in(batch.column("query_id"), pa.array(wanted, pa.string())))
    return _bucket_batch(batch, **kw)


def _join_bucket(batch: dict[str, np.ndarray], *, prep: str, queries_buckets: int) -> dict[str, np.ndarray]:
    n = 0
    for k in batch["id"].tolist():
        pools = _read_folder(store.join(prep, "pools", f"b-{k}"))
        if pools is None:
            continue
        passages = _read_folder(store.join(prep, "corpus", f"b-{k}"))
        joined = join_passages(pools, passages if passages is not None else PASSAGE_SCHEMA.empty_table())
        for j, rows in split_by_bucket(joined, "query_id", queries_buckets):
            _write(rows, store.join(prep, "joined", f"c-{j}", f"b-{k}.parquet"))  # a retry overwrites it
        n += pools.num_rows
    return _stats(n)


def _query_bucket(
    batch: dict[str, np.ndarray], *, prep: str, inputs: str, acfg: AnnotateConfig
) -> dict[str, np.ndarray]:
    n = 0
    for j in batch["id"].tolist():
        rows = _read_folder(store.join(prep, "joined", f"c-{j}"))
        if rows is None:
            continue
        queries = _read_folder(store.join(prep, "queries", f"c-{j}"))
        texts = {}
        if queries is not None:
            texts = dict(zip(queries.column("query_id").to_pylist(), queries.column("text").to_pylist()))
        table = query_rows(rows, texts, j, acfg)
        _write(table, store.join(inputs, f"part-{j:05d}.parquet"))  # one file per bucket: a retry overwrites it
        n += table.num_rows
    return _stats(n)


def udf(fn: Callable) -> Any:
    """A function with keyword arguments as a map_batches UDF (Ray's stubs know only fn(batch))."""
    return fn


def _drain(ds) -> int:
    return sum(int(b["rows"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))


def count_rows(location: str) -> int:
    fs, path = store.filesystem(location)
    return pads.dataset(path, format="parquet", filesystem=fs).count_rows()


def _prepare_one_bucket(
    pools_path: str, queries_path: str, corpus_path: str, inputs: str, acfg: AnnotateConfig, wanted: list[str] | None
) -> int:
    """The whole job as one bucket, in one task: prepare_local's rows as ``inputs/part-00000.parquet``."""

    def read(location: str, columns: list[str]) -> pa.Table:
        table = _read_folder(location, columns)
        return table if table is not None else pa.table({c: pa.array([], pa.string()) for c in columns})

    pools = read(pools_path, POOL_COLUMNS)
    for key in ("query_id", "doc_id"):  # the join compares plain strings, as _bucket_pools does
        pools = pools.set_column(pools.schema.get_field_index(key), key, pc.cast(pools.column(key), pa.string()))
    table = prepare_local(
        pools, read(queries_path, ["query_id", "text"]), read(corpus_path, ["doc_id", "title", "text"]), acfg, wanted
    )
    _write(table, store.join(inputs, "part-00000.parquet"))
    return table.num_rows


def prepare_inputs(
    pools_path: str, queries_path: str, corpus_path: str, out: str, acfg: AnnotateConfig, wanted: list[str] | None
) -> dict:
    """Write ``<out>/inputs/part-*.parquet`` (INPUT_SCHEMA); returns counts."""
    import ray

    prep, inputs = store.join(out, "prep"), store.join(out, "inputs")
    for folder in (prep, inputs):
        store.remove(folder)
    doc_buckets = max(1, math.ceil(count_rows(corpus_path) / DOCS_PER_BUCKET))
    pool_rows = count_rows(pools_path)
    query_buckets = max(1, math.ceil(pool_rows / POOL_ROWS_PER_PART))
    if wanted is not None:
        query_buckets = max(1, math.ceil(len(wanted) * 31 / POOL_ROWS_PER_PART))
    if doc_buckets == 1 and query_buckets == 1:
        from utilrag.raycluster import on_a_cpu_node

        queries = on_a_cpu_node(_prepare_one_bucket, pools_path, queries_path, corpus_path, inputs, acfg, wanted)
        return {"queries": queries, "doc_buckets": 1, "query_buckets": 1}
    steps = [
        read_parquet_tasks(corpus_path, ["doc_id", "title", "text"]).map_batches(
            udf(_bucket_corpus),
            batch_format="pyarrow",
            fn_kwargs=dict(
                passage_words=acfg.passage_words,
                key="doc_id",
                buckets=doc_buckets,
                folder=store.join(prep, "corpus"),
                name="b",
            ),
        ),
        read_parquet_tasks(pools_path, POOL_COLUMNS).map_batches(
            udf(_bucket_pools),
            batch_format="pyarrow",
            fn_kwargs=dict(
                wanted=wanted, key="doc_id", buckets=doc_buckets, folder=store.join(prep, "pools"), name="b"
            ),
        ),
        read_parquet_tasks(queries_path, ["query_id", "text"]).map_batches(
            udf(_bucket_batch),
            batch_format="pyarrow",
            fn_kwargs=dict(key="query_id", buckets=query_buckets, folder=store.join(prep, "queries"), name="c"),
        ),
    ]
    for step in steps:
        _drain(step)
    _drain(
        ray.data.range(doc_buckets).map_batches(
            udf(_join_bucket), batch_size=1, fn_kwargs=dict(prep=prep, queries_buckets=query_buckets)
        )
    )
    queries = _drain(
        ray.data.range(query_buckets).map_batches(
            udf(_query_bucket), batch_size=1, fn_kwargs=dict(prep=prep, inputs=inputs, acfg=acfg)
        )
    )
    store.remove(prep)
    return {"queries": queries, "doc_buckets": doc_buckets, "query_buckets": query_buckets}
