"""The querygen stage: questions for a corpus that has none (InPars / Promptagator style).

A seeded sample of the corpus's passages is grouped into small pools; the annotation chain's runner
(the same replicas, exactly-once parts, engine-death handling as annotate) writes one question per
passage and prompt variant (``annotate.prompts.question_messages``). The questions are then cleaned,
deduplicated, filtered (BM25 must rank the source passage in its top ``filter_k``), and split by
*document*: ``heldout_percent`` of the documents give evaluation questions (qrels split ``gen-test``),
the rest training questions (``gen-train``), so a retriever is never scored on questions written from
its own training documents. The source passage of each kept question is its qrels row (grade 1): a
weak positive that pools and ``train.labels: human`` use, and that the LLM labels need not.

Outputs under output_dir/querygen/<dataset>/: ``pool/`` (the sampled passages as pools),
``questions/`` (the chain's folder: ``question.parquet`` one row per passage and variant, report),
``queries/`` (``queries/`` and ``qrels/`` tables: the ingested ones plus the kept questions, which
every later stage reads in place of the ingested ones; ``generated.parquet``: every question with its
fate).
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from utilrag import store
from utilrag.annotate import Chain, annotate_pools
from utilrag.annotate.engine import check_model, resolve_llm
from utilrag.annotate.prompts import QUESTION_PROMPT_VERSION
from utilrag.config import QUESTION_STAGE, AnnotateConfig, BM25Config, PipelineConfig, QueryGenConfig
from utilrag.data.dataset import open_dataset
from utilrag.data.lexical import bm25_search
from utilrag.data.tables import SCHEMAS, fingerprint, heldout, read_table, write_table
from utilrag.errors import UtilragError
from utilrag.logs import get_logger
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import QueryGenSummary

log = get_logger("querygen")

GROUP = 8  # passages per chain "query" (a block of the runner's work is batch_size groups)
TRAIN_SPLIT, TEST_SPLIT = "gen-train", "gen-test"
GENERATED_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("text", pa.string()),
        ("doc_id", pa.string()),  # the source passage
        ("document", pa.string()),  # its document (a plain-layout passage D#k belongs to D)
        ("variant", pa.int32()),
        ("split", pa.string()),  # gen-train / gen-test
        ("kept", pa.bool_()),
        ("reason", pa.string()),  # why not kept: empty, too short, duplicate, bm25 filter
        ("bm25_rank", pa.int32()),  # the source passage's BM25 rank for the question; null: not in the top k
    ]
)


def document_of(doc_id: str) -> str:
    """The document a passage belongs to: the plain layout names passage k of document D ``D#k``."""
    return doc_id.rsplit("#", 1)[0] if "#" in doc_id else doc_id


def normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def question_config(cfg: PipelineConfig, qcfg: QueryGenConfig) -> AnnotateConfig:
    """The chain's settings for question writing: annotate's engine, scale and constrained decoding
    (a question's format, prompts.QUESTION_REGEX), or their defaults; querygen's temperature."""
    base = cfg.annotate or AnnotateConfig(model=qcfg.model or "")
    sampling = base.sampling.model_copy(update={"temperature": qcfg.temperature, "max_tokens": qcfg.max_tokens})
    return base.model_copy(
        update={"model": qcfg.model or base.model, "stages": [QUESTION_STAGE], "sampling": sampling, "targets": []}
    )


def sample_pool(cfg: PipelineConfig, qcfg: QueryGenConfig) -> tuple[str, str]:
    """The sampled passages as pools of ``GROUP`` (querygen/<dataset>/pool/); (folder, fingerprint)."""
    dataset = open_dataset(cfg, qcfg.dataset, generated=False)
    if not dataset.has("corpus"):
        raise UtilragError(f"querygen: dataset {qcfg.dataset!r} has no corpus")
    out = Store(cfg.output_dir).querygen(qcfg.dataset, "pool")
    settings = qcfg.model_dump(include={"passages", "per_passage", "seed"})
    fp = fingerprint({"input": dataset.fingerprint, "config": settings})
    if store.reusable(out, fp) is not None:
        return out, fp
    writer = store.begin(out, "querygen", fp)
    ids = sorted(dataset.table("corpus", columns=["doc_id"]).column("doc_id").to_pylist())  # not the parts' order
    picked = sorted(random.Random(qcfg.seed).sample(ids, min(qcfg.passages, len(ids))))
    groups = [picked[i : i + GROUP] for i in range(0, len(picked), GROUP)]
    if len(groups) > 1 and len(groups[-1]) < 2:  # a chain pool needs two passages
        groups[-2] += groups.pop()
    if len(groups) == 1 and len(groups[0]) < 2:
        raise UtilragError(f"querygen: dataset {qcfg.dataset!r} has {len(ids)} passage(s); questions need two")
    rows: dict[str, list] = {n: [] for n in SCHEMAS["pools"].names}
    queries: dict[str, list] = {"query_id": [], "text": []}
    for variant in range(qcfg.per_passage):
        for g, group in enumerate(groups):
            qid = f"v{variant}-g{g:06d}"
            queries["query_id"].append(qid)
            queries["text"].append(str(variant))  # the chain's question stage reads its prompt variant here
            for position, d in enumerate(group):
                for name, value in zip(rows, (qid, d, position, "sample", None)):
                    rows[name].append(value)
    write_table(pa.table(rows, schema=SCHEMAS["pools"]), writer.path("pools.parquet"))
    write_table(pa.table(queries, schema=SCHEMAS["queries"]), writer.path("queries/part-0.parquet"))
    writer.commit(rows={"passages": len(picked), "groups": len(groups) * qcfg.per_passage})
    return out, fp


def run_querygen(cfg: PipelineConfig, qcfg: QueryGenConfig) -> tuple[str, bool]:
    """Questions for one dataset; (querygen/<dataset>/queries, reused)."""
    dataset = open_dataset(cfg, qcfg.dataset, generated=False)
    acfg = question_config(cfg, qcfg)
    pool, pool_fp = sample_pool(cfg, qcfg)
    out = Store(cfg.output_dir).querygen(qcfg.dataset, "queries")
    fp = fingerprint(
        {
            "pool": pool_fp,
            "dataset": dataset.fingerprint,
            "chain": acfg.content_settings(),
            "prompt": QUESTION_PROMPT_VERSION,
            "config": qcfg.model_dump(exclude={"model"}),
        }
    )
    if store.reusable(out, fp) is not None:
        log.info(f"{qcfg.dataset}: unchanged, reusing {out}")
        return out, True
    model_path = resolve_llm(acfg.model)
    check_model(model_path, acfg.engine.use_gpu)
    if cfg.annotate is not None and acfg.model == cfg.annotate.model:
        log.info(f"{qcfg.dataset}: the annotator ({acfg.model}) writes the questions too")
    pool_done = store.require(pool, "querygen: the sampled passages")
    chain = Chain(
        out=Store(cfg.output_dir).querygen(qcfg.dataset, "questions"),
        paths={
            "pools": pool_done.path("pools.parquet"),
            "queries": pool_done.path("queries"),
            "corpus": dataset.location("corpus"),
        },
        pools_fingerprint=pool_fp,
        key={"querygen": qcfg.dataset, "prompt": QUESTION_PROMPT_VERSION},
        label=f"{qcfg.dataset} questions",
        max_queries=None,
        sample_seed=f"querygen:{qcfg.dataset}",
        stage="querygen",
    )
    questions = annotate_pools(cfg, acfg, chain, model_path)
    rows = read_table(store.join(questions, f"{QUESTION_STAGE}.parquet"), ["query_id", "doc_ids", "answer"])
    t0 = time.time()  # the chain's own folder has its time: this one's is the screening
    generated, counts = screen(rows, dataset, qcfg)
    kept = generated.filter(pc.field("kept"))
    splits = Counter(kept.column("split").to_pylist())
    if not splits[TRAIN_SPLIT] or (qcfg.heldout_percent > 0 and not splits[TEST_SPLIT]):
        drops = ", ".join(f"{n:,} {why}" for why, n in sorted(counts.items())) or "none dropped"
        raise UtilragError(
            f"querygen: {splits[TRAIN_SPLIT]:,} {TRAIN_SPLIT} and {splits[TEST_SPLIT]:,} {TEST_SPLIT} questions kept "
            "of "
            f"{generated.num_rows:,} ({drops}); raise querygen.passages, or loosen filter / filter_k / min_words "
            f"(every question and its fate: {store.join(questions, f'{QUESTION_STAGE}.parquet')})"
        )
    writer = store.begin(out, "querygen", fp)
    ingested_q, ingested_qrels = dataset.table("queries"), dataset.table("qrels")
    clash = set(ingested_q.column("query_id").to_pylist()) & set(kept.column("query_id").to_pylist())
    if clash:
        raise UtilragError(f"querygen: generated ids clash with the dataset's own queries ({sorted(clash)[:3]})")
    queries = pa.concat_tables([ingested_q, kept.select(["query_id", "text"]).cast(SCHEMAS["queries"])])
    source = pa.table(
        {
            "query_id": kept.column("query_id"),
            "doc_id": kept.column("doc_id"),
            # relevant at the dataset's own threshold (1 for a corpus of your own)
            "grade": pa.array([max(1, dataset.relevance_threshold)] * kept.num_rows, pa.int32()),
            "split": kept.column("split"),
        },
        schema=SCHEMAS["qrels"],
    )
    write_table(queries, writer.path("queries/part-0.parquet"))
    write_table(pa.concat_tables([ingested_qrels, source]), writer.path("qrels/part-0.parquet"))
    write_table(generated, writer.path("generated.parquet"))
    summary = QueryGenSummary(
        ingest_fingerprint=dataset.fingerprint,
        model=acfg.model,
        prompt_version=QUESTION_PROMPT_VERSION,
        config=qcfg.model_dump(),
        rows={"queries": queries.num_rows, "generated": generated.num_rows, "kept": kept.num_rows, **splits},
        dropped=dict(counts),
        wall_time_s=round(time.time() - t0, 2),
    )
    writer.commit(**summary.manifest())
    drops = ", ".join(f"{n:,} {why}" for why, n in sorted(counts.items())) or "none"
    log.info(
        f"{qcfg.dataset}: {kept.num_rows:,} of {generated.num_rows:,} questions kept ({splits[TRAIN_SPLIT]:,} "
        f"{TRAIN_SPLIT}, {splits[TEST_SPLIT]:,} {TEST_SPLIT}); dropped: {drops} -> {out}"
    )
    return out, False


def screen(rows: pa.Table, dataset, qcfg: QueryGenConfig) -> tuple[pa.Table, Counter]:
    """Every question with its fate: kept, or dropped as empty / too short / a duplicate / not finding
    its passage with BM25."""
    out: dict[str, list] = {n: [] for n in GENERATED_SCHEMA.names}
    dropped: Counter = Counter()
    seen: set[str] = set()
    for group, doc_ids, text in zip(*(rows.column(c).to_pylist() for c in ["query_id", "doc_ids", "answer"])):
        d = doc_ids[0]
        variant = int(group.split("-", 1)[0][1:])
        document = document_of(d)
        digest = hashlib.sha1(f"{d}\t{variant}".encode()).hexdigest()[:12]
        reason = None
        text = text or ""
        if not text:
            reason = "empty"
        elif len(text.split()) < qcfg.min_words:
            reason = "too short"
        elif (words := normalized(text)) in seen:
            reason = "duplicate"
        else:
            seen.add(words)
        values = (
            f"gen-{digest}",
            text,
            d,
            document,
            variant,
            TEST_SPLIT if heldout(document, qcfg.heldout_percent, qcfg.seed) else TRAIN_SPLIT,
            reason is None,
            reason,
            None,
        )
        for name, value in zip(out, values):
            out[name].append(value)
    if qcfg.filter == "bm25":
        bm25_filter(out, dataset, qcfg)
    for reason in out["reason"]:
        if reason:
            dropped[reason] += 1
    return pa.table(out, schema=GENERATED_SCHEMA), dropped


def bm25_filter(out: dict[str, list], dataset, qcfg: QueryGenConfig) -> None:
    """InPars' consistency filter, with BM25, on ``screen``'s columns in place: a question whose source
    passage BM25 does not rank in its top ``filter_k`` over the whole corpus is dropped (``bm25_rank``
    records the rank either way)."""
    live = [i for i, kept in enumerate(out["kept"]) if kept]
    if not live:
        return
    run = bm25_search(
        dataset.table("corpus"),
        [out["query_id"][i] for i in live],
        [out["text"][i] for i in live],
        BM25Config(dataset=qcfg.dataset, split="all", k=qcfg.filter_k),
    )
    found = {(q, d): r for q, d, r in zip(*(run.column(c).to_pylist() for c in ["query_id", "doc_id", "rank"]))}
    for i in live:
        rank = out["bm25_rank"][i] = found.get((out["query_id"][i], out["doc_id"][i]))
        if rank is None:
            out["kept"][i], out["reason"][i] = False, f"source passage not in BM25's top {qcfg.filter_k}"


def run(cfg: PipelineConfig) -> StageResult:
    """The querygen stage."""
    t0 = time.time()
    if cfg.querygen is None:
        raise UtilragError("the config has no querygen section (querygen: {dataset, passages})")
    out, reused = run_querygen(cfg, cfg.querygen)
    return StageResult("querygen", [out], reused=int(reused), wall_s=time.time() - t0)
