"""Candidate pools for annotation: per training query its human positives plus hard negatives
from a run (BM25 when none is given), cut to the pool size, or the dataset's own pools (Tevatron);
either way shuffled per query with a seed."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa

from utilrag import store
from utilrag.config import BM25Config, PipelineConfig, PoolsConfig
from utilrag.data.dataset import DatasetInputError, open_dataset
from utilrag.data.lexical import bm25_search
from utilrag.data.tables import SCHEMAS, fingerprint, read_table, write_table
from utilrag.logs import get_logger
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import PoolsSummary

log = get_logger("pools")


def build_pools(
    qrels: pa.Table,
    run: pa.Table,
    query_ids: list[str],
    size: int,
    seed: int,
    threshold: int,
    negative_source: str,
    corpus_ids: set[str] | None = None,
    keep_unlabeled: bool = False,
) -> tuple[pa.Table, dict]:
    """Positives (grade >= threshold) first, then the run's top documents that are not judged
    relevant, to ``size``; each pool shuffled by a per-query seeded RNG (stable under subsetting).
    With ``corpus_ids``, judged positives without a text in the corpus (DL19 judges passages
    outside its shipped pool) are left out and counted: an annotator cannot be shown them. With
    ``keep_unlabeled``, a query without a positive keeps a pool of the run's top passages (none of them
    known relevant: what the annotator then labels is all the signal there is)."""
    grades: dict[str, dict[str, int]] = defaultdict(dict)
    for q, d, g in zip(*(qrels.column(c).to_pylist() for c in ["query_id", "doc_id", "grade"])):
        grades[q][d] = g
    ranked: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for q, d, r in zip(*(run.column(c).to_pylist() for c in ["query_id", "doc_id", "rank"])):
        ranked[q].append((r, d))
    # several runs interleaved (interleave): each negative is tagged with the run it came from
    source_of = (
        dict(
            zip(
                zip(run.column("query_id").to_pylist(), run.column("doc_id").to_pylist()),
                run.column("source").to_pylist(),
            )
        )
        if "source" in run.column_names
        else {}
    )
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMAS["pools"].names}
    stats = {"queries": 0, "no_positive": 0, "short_pool": 0, "positives_cut": 0, "positives_without_text": 0}
    if keep_unlabeled:
        stats["unlabeled_kept"] = 0
    for qid in query_ids:
        positives = sorted(d for d, g in grades[qid].items() if g >= threshold)
        if corpus_ids is not None:
            stats["positives_without_text"] += sum(d not in corpus_ids for d in positives)
            positives = [d for d in positives if d in corpus_ids]
        if not positives:
            stats["no_positive"] += 1
            if not keep_unlabeled or not ranked[qid]:
                continue
            stats["unlabeled_kept"] += 1
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
        pool = [(d, "human") for d in positives] + [(d, source_of.get((qid, d), negative_source)) for d in negatives]
        random.Random(f"{seed}:{qid}").shuffle(pool)
        for position, (d, source) in enumerate(pool):
            rows["query_id"].append(qid)
            rows["doc_id"].append(d)
            rows["position"].append(position)
            rows["source"].append(source)
            rows["human_grade"].append(grades[qid].get(d))
        stats["queries"] += 1
    return pa.table(rows, schema=SCHEMAS["pools"]), stats


def interleave(runs: list[tuple[str, pa.Table]]) -> pa.Table:
    """Several runs as one candidate run: per query, their rank-1 passages (in the order given), then their
    rank-2 ones, ..., each passage once, where it first appears; ``source`` names the run it came from."""
    ranked: dict[str, list[list[str]]] = defaultdict(lambda: [[] for _ in runs])
    for i, (_, run) in enumerate(runs):
        rows = sorted(zip(*(run.column(c).to_pylist() for c in ["query_id", "rank", "doc_id"])))
        for q, _, d in rows:
            ranked[q][i].append(d)
    out: dict[str, list[Any]] = {"query_id": [], "doc_id": [], "rank": [], "source": []}
    for q, lists in ranked.items():
        seen: set[str] = set()
        for depth in range(max(map(len, lists))):
            for i, docs in enumerate(lists):
                if depth < len(docs) and docs[depth] not in seen:
                    seen.add(docs[depth])
                    out["query_id"].append(q)
                    out["doc_id"].append(docs[depth])
                    out["rank"].append(len(seen))
                    out["source"].append(runs[i][0])
    return pa.table(out)


def shuffle_given_pools(pools: pa.Table, seed: int, max_queries: int | None = None) -> tuple[pa.Table, dict]:
    """Pools that came with the dataset (Tevatron: positives first), each shuffled by the same
    per-query seeded RNG as built pools, so that the human positive is not always shown first (an
    annotator's position bias would otherwise inflate every agreement figure and label)."""
    by_query: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, (q, position) in enumerate(zip(pools.column("query_id").to_pylist(), pools.column("position").to_pylist())):
        by_query[q].append((position, i))
    qids = sorted(by_query)
    if max_queries is not None and max_queries < len(qids):
        qids = sorted(random.Random(seed).sample(qids, max_queries))
    take: list[int] = []
    positions: list[int] = []
    for q in qids:
        rows = [i for _, i in sorted(by_query[q])]
        random.Random(f"{seed}:{q}").shuffle(rows)
        take += rows
        positions += range(len(rows))
    shuffled = pools.take(pa.array(take, pa.int64())).set_column(
        pools.schema.get_field_index("position"), "position", pa.array(positions, pa.int32())
    )
    return shuffled.cast(SCHEMAS["pools"]), {"queries": len(qids), "given": True, "shuffled_with_seed": seed}


def run_pools(cfg: PipelineConfig, pcfg: PoolsConfig) -> tuple[str, bool]:
    """The pools of one dataset/split: output_dir/pools/<dataset>-<split>/pools.parquet.
    Returns the folder and whether it was reused."""
    dataset = open_dataset(cfg, pcfg.dataset)
    out = Store(cfg.output_dir).pools(pcfg.dataset, pcfg.split)
    given = {"given": "shuffled"} if dataset.has("pools") else {}  # built pools' fingerprints unchanged
    # keep_unlabeled left at null: the fingerprints of pools built before it existed stay as they were
    unset = {k for k in ("keep_unlabeled", "dense") if getattr(pcfg, k) is None}
    settings = pcfg.model_dump(exclude=unset)
    dense = dense_run(cfg, pcfg) if pcfg.dense and not dataset.has("pools") else None
    searched = {"dense_run": dense[1]} if dense else {}  # the dense search's own fingerprint: its candidates
    fp = fingerprint({"input": dataset.fingerprint, "config": settings, "positives": "with-text", **given, **searched})
    if store.reusable(out, fp) is not None:
        log.info(f"{pcfg.dataset}/{pcfg.split}: unchanged, reusing {out}")
        return out, True
    t0 = time.time()
    writer = store.begin(out, "pools", fp)
    if dataset.has("pools") and pcfg.dense:
        raise DatasetInputError(
            f"pools ({pcfg.dataset}/{pcfg.split}): the dataset brings its own pools; pools.dense would not be used"
        )
    if dataset.has("pools"):  # Tevatron: the dataset's own pools, shuffled per query
        pools, stats = shuffle_given_pools(dataset.table("pools"), pcfg.seed, pcfg.max_queries)
    else:
        qrels = dataset.qrels(pcfg.split)
        qids, texts = dataset.split_queries(pcfg.split)
        if pcfg.max_queries is not None and pcfg.max_queries < len(qids):
            picked = sorted(random.Random(pcfg.seed).sample(range(len(qids)), pcfg.max_queries))
            qids, texts = [qids[i] for i in picked], [texts[i] for i in picked]
        lexical = pcfg.run or "bm25s"  # the negatives' source: the ingested run, or BM25 over the corpus
        if pcfg.run:
            run = dataset.run(pcfg.run)
        else:
            run = bm25_search(
                dataset.table("corpus"),
                qids,
                texts,
                BM25Config(dataset=pcfg.dataset, split=pcfg.split, k=pcfg.size * 3),
            )
        if dense is not None:  # the off-the-shelf encoder's candidates, rank by rank with the lexical ones
            run = interleave([(lexical, run), (f"dense:{pcfg.dense}", dense[0])])
        corpus_ids = set(dataset.table("corpus", columns=["doc_id"]).column("doc_id").to_pylist())
        pools, stats = build_pools(
            qrels,
            run,
            qids,
            pcfg.size,
            pcfg.seed,
            dataset.relevance_threshold,
            lexical,
            corpus_ids,
            keep_unlabeled=pcfg.keep_unlabeled if pcfg.keep_unlabeled is not None else not dataset.has("qrels"),
        )
    write_table(pools, writer.path("pools.parquet"))
    summary = PoolsSummary(
        # every pool is shuffled by random.Random(f"{seed}:{query_id}"): the order shown to the annotator
        shuffle={"seed": pcfg.seed, "rng": "random.Random(f'{seed}:{query_id}')"},
        config=pcfg.model_dump(),
        rows={"pools": pools.num_rows},
        stats=stats,
        wall_time_s=round(time.time() - t0, 2),
    )
    writer.commit(**summary.manifest())
    log.info(f"{pcfg.dataset}/{pcfg.split}: {stats} -> {pools.num_rows:,} rows in {time.time() - t0:.1f}s")
    return out, False


def dense_run(cfg: PipelineConfig, pcfg: PoolsConfig) -> tuple[pa.Table, str]:
    """The dense candidates of a pools section (pools.dense: the 'candidates' stage's search) and their
    fingerprint; one line when that search has not run."""
    assert pcfg.dense is not None
    folder = Store(cfg.output_dir).dense_run(pcfg.dataset, pcfg.split, pcfg.dense)
    done = store.require(
        folder, f"pools ({pcfg.dataset}/{pcfg.split}): the dense candidates {pcfg.dense!r} (stage candidates)"
    )
    return read_table(done.path("run.parquet"), columns=["query_id", "doc_id", "rank"]), done["input_fingerprint"]


def run(cfg: PipelineConfig) -> StageResult:
    """The pools stage: every configured pools section."""
    t0 = time.time()
    done = [run_pools(cfg, pcfg) for pcfg in cfg.pools]
    return StageResult("pools", [o for o, _ in done], reused=sum(r for _, r in done), wall_s=time.time() - t0)
