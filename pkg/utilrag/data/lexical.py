"""BM25 retrieval with bm25s (sparse matrices, numpy scoring) over a corpus table: used by the pools
stage for hard negatives and by the BM25 stage for its runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from utilrag.config import BM25Config
from utilrag.data.tables import SCHEMAS


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


def write_trec_run(run: pa.Table, location: str) -> None:
    """The run as a TREC file (qid Q0 docid rank score tag), streamed in slices (local or URI)."""
    import io

    from utilrag.store import filesystem

    fs, path = filesystem(location)
    with fs.open_output_stream(path) as raw, io.TextIOWrapper(raw, encoding="utf-8") as out:
        for start in range(0, run.num_rows, 100_000):
            part = run.slice(start, 100_000)
            for q, d, r, s, name in zip(
                *(part.column(c).to_pylist() for c in ["query_id", "doc_id", "rank", "score", "run"])
            ):
                out.write(f"{q} Q0 {d} {r} {s:.6f} {name}\n")
