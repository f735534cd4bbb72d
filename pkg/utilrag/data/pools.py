"""Candidate pools for annotation: per training query its human positives plus hard negatives
from a run (BM25 when none is given), cut to the pool size and shuffled with a seed."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from utilrag.config import BM25Config, PipelineConfig, PoolsConfig
from utilrag.data.ingest import IngestError, dataset_dir, qrels_split, relevance_threshold
from utilrag.data.tables import SCHEMAS, fingerprint, read_manifest, read_table, require_manifest, write_manifest


def build_pools(
    qrels: pa.Table,
    run: pa.Table,
    query_ids: list[str],
    size: int,
    seed: int,
    threshold: int,
    negative_source: str,
    corpus_ids: set[str] | None = None,
) -> tuple[pa.Table, dict]:
    """Positives (grade >= threshold) first, then the run's top documents that are not judged
    relevant, to ``size``; each pool shuffled by a per-query seeded RNG (stable under subsetting).
    With ``corpus_ids``, judged positives without a text in the corpus (DL19 judges passages
    outside its shipped pool) are left out and counted: an annotator cannot be shown them."""
    grades: dict[str, dict[str, int]] = defaultdict(dict)
    for q, d, g in zip(*(qrels.column(c).to_pylist() for c in ["query_id", "doc_id", "grade"])):
        grades[q][d] = g
    ranked: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for q, d, r in zip(*(run.column(c).to_pylist() for c in ["query_id", "doc_id", "rank"])):
        ranked[q].append((r, d))
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMAS["pools"].names}
    stats = {"queries": 0, "no_positive": 0, "short_pool": 0, "positives_cut": 0, "positives_without_text": 0}
    for qid in query_ids:
        positives = sorted(d for d, g in grades[qid].items() if g >= threshold)
        if corpus_ids is not None:
            stats["positives_without_text"] += sum(d not in corpus_ids for d in positives)
            positives = [d for d in positives if d in corpus_ids]
        if not positives:
            stats["no_positive"] += 1
            continue
        if len(positives) > size - 1:  # keep room for at least one negative
            stats["positives_cut"] += 1
            positives = random.Random(f"{seed}:{qid}:pos").sample(positives, size - 1)
        chosen = set(positives)
        negatives: list[str] = []
        for _, d in sorted(ranked[qid]):
            if len(positives) + len(negatives) >= size:
                break
            if d not in chosen and grades[qid].get(d, 0) < threshold:
                negatives.append(d)
                chosen.add(d)
        if len(positives) + len(negatives) < size:
            stats["short_pool"] += 1
        pool = [(d, "human") for d in positives] + [(d, negative_source) for d in negatives]
        random.Random(f"{seed}:{qid}").shuffle(pool)
        for position, (d, source) in enumerate(pool):
            rows["query_id"].append(qid)
            rows["doc_id"].append(d)
            rows["position"].append(position)
            rows["source"].append(source)
            rows["human_grade"].append(grades[qid].get(d))
        stats["queries"] += 1
    return pa.table(rows, schema=SCHEMAS["pools"]), stats


def run_pools(cfg: PipelineConfig, pcfg: PoolsConfig) -> Path:
    """The pools stage for one dataset/split: output_dir/pools/<dataset>-<split>/pools.parquet."""
    from utilrag.index.bm25 import bm25_search, split_queries

    source = dataset_dir(cfg, pcfg.dataset)
    out = Path(cfg.output_dir) / "pools" / f"{pcfg.dataset}-{pcfg.split}"
    fp = fingerprint(
        {
            "input": require_manifest(source, f"pools: dataset {pcfg.dataset!r}")["input_fingerprint"],
            "config": pcfg.model_dump(),
            "positives": "with-text",
        }
    )
    old = read_manifest(out)
    if old and old.get("input_fingerprint") == fp and (out / "pools.parquet").is_file():
        print(f"[pools] {pcfg.dataset}/{pcfg.split}: unchanged, reusing {out}", flush=True)
        return out
    t0 = time.time()
    if (source / "pools").is_dir():  # Tevatron pools are taken as given
        pools = read_table(source / "pools")
        stats = {"queries": len(set(pools.column("query_id").to_pylist())), "taken_as_given": True}
    else:
        qrels = qrels_split(read_table(source / "qrels"), pcfg.split)
        qids, texts = split_queries(cfg, pcfg.dataset, pcfg.split)
        if pcfg.max_queries is not None and pcfg.max_queries < len(qids):
            picked = sorted(random.Random(pcfg.seed).sample(range(len(qids)), pcfg.max_queries))
            qids, texts = [qids[i] for i in picked], [texts[i] for i in picked]
        if pcfg.run:
            runs = read_table(source / "runs") if (source / "runs").is_dir() else None
            names = sorted(set(runs.column("run").to_pylist())) if runs is not None else []
            if pcfg.run not in names:
                raise IngestError(f"pools: run {pcfg.run!r} not in dataset {pcfg.dataset!r} (runs: {names})")
            assert runs is not None  # names came from it
            run = runs.filter(pc.equal(runs.column("run"), pcfg.run))
        else:
            run = bm25_search(
                read_table(source / "corpus"),
                qids,
                texts,
                BM25Config(dataset=pcfg.dataset, split=pcfg.split, k=pcfg.size * 3),
            )
        corpus_ids = set(read_table(source / "corpus", columns=["doc_id"]).column("doc_id").to_pylist())
        pools, stats = build_pools(
            qrels,
            run,
            qids,
            pcfg.size,
            pcfg.seed,
            relevance_threshold(cfg, pcfg.dataset),
            pcfg.run or "bm25s",
            corpus_ids,
        )
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pools, out / "pools.parquet")
    write_manifest(
        out,
        stage="pools",
        config=pcfg.model_dump(),
        input_fingerprint=fp,
        rows={"pools": pools.num_rows},
        stats=stats,
        wall_time_s=round(time.time() - t0, 2),
    )
    print(
        f"[pools] {pcfg.dataset}/{pcfg.split}: {stats} -> {pools.num_rows:,} rows in {time.time() - t0:.1f}s",
        flush=True,
    )
    return out
