"""BM25 retrieval over an ingested corpus with bm25s (sparse matrices, numpy scoring)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from utilrag.config import BM25Config, PipelineConfig
from utilrag.data.ingest import dataset_dir, qrels_split
from utilrag.data.tables import SCHEMAS, fingerprint, read_manifest, read_table, require_manifest, write_manifest


def build_bm25(corpus: pa.Table, cfg: BM25Config):
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer(cfg.stemmer) if cfg.stemmer else None
    tokenizer = bm25s.tokenization.Tokenizer(stemmer=stemmer, stopwords=cfg.stopwords)
    fields = [corpus.column(f).to_pylist() for f in cfg.fields]
    texts = [" ".join(parts) for parts in zip(*fields)]
    tokens = tokenizer.tokenize(texts, return_as="ids", show_progress=False)
    retriever = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
    retriever.index(tokens, show_progress=False)
    return tokenizer, retriever


def bm25_search(
    corpus: pa.Table, query_ids: list[str], query_texts: list[str], cfg: BM25Config, run_name: str = "bm25s"
) -> pa.Table:
    """Top-k BM25 documents per query as a ``runs`` table (rank from 1, ties by doc order)."""
    tokenizer, retriever = build_bm25(corpus, cfg)
    doc_ids = np.asarray(corpus.column("doc_id").to_pylist(), dtype=object)
    q_tokens = tokenizer.tokenize(query_texts, return_as="ids", update_vocab=False, show_progress=False)
    k = min(cfg.k, corpus.num_rows)
    docs, scores = retriever.retrieve(q_tokens, k=k, show_progress=False, n_threads=1)
    rows: dict[str, list[Any]] = {"query_id": [], "doc_id": [], "rank": [], "score": [], "run": []}
    for qi, qid in enumerate(query_ids):
        keep = scores[qi] > 0  # a zero score means no query term matched: not retrieved
        for rank, (d, s) in enumerate(zip(docs[qi][keep], scores[qi][keep]), start=1):
            rows["query_id"].append(qid)
            rows["doc_id"].append(doc_ids[d])
            rows["rank"].append(rank)
            rows["score"].append(float(s))
            rows["run"].append(run_name)
    return pa.table(rows, schema=SCHEMAS["runs"])


def write_trec_run(run: pa.Table, path: Path) -> None:
    with open(path, "w") as out:
        for q, d, r, s, name in zip(
            *(run.column(c).to_pylist() for c in ["query_id", "doc_id", "rank", "score", "run"])
        ):
            out.write(f"{q} Q0 {d} {r} {s:.6f} {name}\n")


def split_queries(cfg: PipelineConfig, dataset: str, split: str | None) -> tuple[list[str], list[str]]:
    """The ids and texts of the queries judged in a qrels split (all queries if split is None)."""
    folder = dataset_dir(cfg, dataset)
    queries = read_table(folder / "queries")
    if split is not None:
        wanted = set(qrels_split(read_table(folder / "qrels"), split).column("query_id").to_pylist())
        queries = queries.filter(pa.array([q in wanted for q in queries.column("query_id").to_pylist()]))
    return queries.column("query_id").to_pylist(), queries.column("text").to_pylist()


def run_bm25(cfg: PipelineConfig, bcfg: BM25Config) -> Path:
    """The BM25 stage for one dataset/split: output_dir/bm25/<dataset>-<split>/{run.parquet,run.trec}."""
    source = dataset_dir(cfg, bcfg.dataset)
    out = Path(cfg.output_dir) / "bm25" / f"{bcfg.dataset}-{bcfg.split}"
    fp = fingerprint(
        {
            "input": require_manifest(source, f"bm25: dataset {bcfg.dataset!r}")["input_fingerprint"],
            "config": bcfg.model_dump(),
        }
    )
    old = read_manifest(out)
    if old and old.get("input_fingerprint") == fp and (out / "run.parquet").is_file():
        print(f"[bm25] {bcfg.dataset}/{bcfg.split}: unchanged, reusing {out}", flush=True)
        return out
    t0 = time.time()
    corpus = read_table(source / "corpus")
    qids, texts = split_queries(cfg, bcfg.dataset, bcfg.split)
    run = bm25_search(corpus, qids, texts, bcfg)
    out.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(run, out / "run.parquet")
    write_trec_run(run, out / "run.trec")
    wall = time.time() - t0
    write_manifest(
        out,
        stage="bm25",
        config=bcfg.model_dump(),
        input_fingerprint=fp,
        rows={"runs": run.num_rows, "queries": len(qids), "corpus": corpus.num_rows},
        wall_time_s=round(wall, 2),
    )
    print(
        f"[bm25] {bcfg.dataset}/{bcfg.split}: {len(qids):,} queries over {corpus.num_rows:,} docs, "
        f"{run.num_rows:,} results in {wall:.1f}s",
        flush=True,
    )
    return out
