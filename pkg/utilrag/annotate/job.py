"""The streaming annotation of one target, as the driver runs it: it holds counters, never the queries.

1. ``inputs/``: one row per query, built by Ray Data tasks (prepare.py), redone only when its
   fingerprint changes (``inputs.meta``).
2. ``chain.parts/``: one Ray Data pipeline, inputs -> ChainAnnotator replicas (chain.py): every stage of
   a block of queries on one engine, one atomic part per block. Exactly once: a rerun skips the input
   files whose queries are all in the parts, drops the finished queries of the partly finished ones
   (their ids only), and redoes every unfinished query whole; the parts' ids must then be complete and
   unique. ``chain.meta`` records the fingerprint and completion: a finished chain starts no engine.
3. The stage tables (``<stage>.parquet``, STAGE_SCHEMA), ``labels.parquet``, ``rejects.parquet`` and the
   report's counts, cut out of the parts one part at a time.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from utilrag import store
from utilrag.annotate.chain import CHAIN_SCHEMA, AsyncChainAnnotator, ChainAnnotator
from utilrag.annotate.engine import AnnotateError, actor_resources, engine_kwargs, fill_figures
from utilrag.annotate.prepare import INPUT_SCHEMA, parquet_files, prepare_inputs, read_parquet_tasks, udf
from utilrag.annotate.report import ReportTally
from utilrag.annotate.stages import (
    LABELS_SCHEMA,
    REJECTS_SCHEMA,
    STAGE_ORDER,
    STAGE_SCHEMA,
    TargetInputs,
    build_labels,
    shown_positions,
)
from utilrag.config import AnnotateConfig
from utilrag.logs import get_logger
from utilrag.raycluster import compress_ray_data_clock

log = get_logger("annotate")
# The reasons a query was not asked, per stage (a chain part records the last one per query).
SKIPS = {
    "answer": ("no_relsel_positive",),
    "utilsel": ("no_relsel_positive", "no_pseudo_answer"),
    "utilrank": ("no_relsel_positive", "no_pseudo_answer"),
}


# --------------------------------------------------------------------------- small helpers
def write_atomic(table: pa.Table, location: str) -> None:
    """All of a file or none of it: locally written aside and renamed into place; on object storage
    one upload, which becomes visible only when complete."""
    fs, path = store.filesystem(location)
    if store.is_remote(location):
        pq.write_table(table, path, filesystem=fs)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def clear_parts(parts: str, changed: bool, label: str) -> None:
    """Before a (re)run writes parts: all of them go if what they were made from changed; otherwise only
    the temporary files of parts being written when the last run was killed."""
    if changed and store.exists(parts):
        log.info(f"{label}: inputs or settings changed; discarding {parts}")
        store.remove(parts)
    for stale in store.list_names(parts):
        if stale.startswith(".tmp-"):
            store.remove(store.join(parts, stale))


def engine_failure(label: str, err: Exception) -> AnnotateError:
    """The engine's own message, not Ray's traceback around it (``label``: the job's target)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if "the vLLM engine did not start: " in line and "{self.error}" not in line:
            return AnnotateError(f"{label}: " + line[line.index("the vLLM engine did not start: ") :])
    return AnnotateError(f"{label}: the job failed: {type(err).__name__}: {' | '.join(lines[-3:])}")


def summary_line(s: dict) -> str:
    rate = f" ({s['generate_s']:.0f}s generating, {s['tokens_per_s']:,.0f} tokens/s)" if s.get("tokens_per_s") else ""
    return (
        f"{s['rows']:,} rows ({s['new_rows']:,} new, {s['resumed_rows']:,} resumed) over {s['queries']:,} queries; "
        f"parse failures {s['parse_failure_rate']:.1%} {s['parse_status']}; {s['prompt_tokens_per_query']:,.0f} "
        f"prompt tokens/query, prefix-cache hits {s['prefix_cache_hit_rate']:.1%}; {s['wall_s']:.0f}s{rate}"
    )


def prefetched(read: Callable[[str], Any], names: list[str], window: int) -> Iterator[Any]:
    """``read(name)`` for each name, in order, up to ``window`` reads in flight on threads: on object
    storage each read is a round trip or two (15,000-23,000 parts at MS MARCO scale), locally it costs
    nothing; at most ``window`` results are held."""
    if not names:
        return
    with ThreadPoolExecutor(max_workers=window) as pool:
        pending: deque = deque()
        for name in names:
            pending.append(pool.submit(read, name))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def read_window(location: str) -> int:
    return 16 if store.is_remote(location) else 2


def read_columns(location: str, columns: list[str]) -> pa.Table:
    """A few columns of every Parquet file of a folder (empty if there is none), file by file (a
    pyarrow dataset over thousands of parts held ~600 MiB of driver memory for 6 MiB of ids here),
    several files in flight on object storage."""
    files = parquet_files(location)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})

    def read(name: str) -> pa.Table:
        fs, path = store.filesystem(name)
        return pq.read_table(path, columns=columns, filesystem=fs, use_threads=False)

    return pa.concat_tables(list(prefetched(read, files, read_window(location))))


class ParquetStream:
    """One Parquet file written a table at a time, in row groups of about ``row_group_rows`` rows or
    ``row_group_bytes`` bytes (the tables given are one chain part each, 16-256 queries: a row group
    apiece would make the file slow to scan); in place only when closed (temporary name + rename
    locally; on object storage the upload becomes visible at close)."""

    def __init__(
        self, location: str, schema: pa.Schema, row_group_rows: int = 131_072, row_group_bytes: int = 64 << 20
    ):
        fs, path = store.filesystem(location)
        self.final = path
        self.local = not store.is_remote(location)
        self.path = posixpath.join(posixpath.dirname(path), f".tmp-{posixpath.basename(path)}") if self.local else path
        if self.local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
        self.writer = pq.ParquetWriter(self.path, schema, filesystem=None if self.local else fs)
        self.rows = 0
        self.row_group_rows, self.row_group_bytes = row_group_rows, row_group_bytes
        self.buffer: list[pa.Table] = []
        self.buffered = self.buffered_bytes = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.buffer.append(table)
            self.buffered += table.num_rows
            self.buffered_bytes += table.nbytes
            self.rows += table.num_rows
            # rows or bytes, whichever comes first: stage rows carry raw outputs (the driver's memory)
            if self.buffered >= self.row_group_rows or self.buffered_bytes >= self.row_group_bytes:
                self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=self.row_group_rows)
            self.buffer, self.buffered, self.buffered_bytes = [], 0, 0

    def close(self) -> None:
        self._flush()
        self.writer.close()
        if self.local:
            os.replace(self.path, self.final)


def explode(part: pa.Table, stage: str) -> pa.Table:
    """A chain part's ``stage`` column (a list of rows per query) as STAGE_SCHEMA rows, sorted."""
    lists = part.column(stage).combine_chunks()
    flat = pc.list_flatten(lists)
    query_ids = part.column("query_id").take(pc.list_parent_indices(lists))
    table = pa.Table.from_arrays([query_ids.combine_chunks(), *flat.flatten()], schema=STAGE_SCHEMA)
    return table.sort_by([("query_id", "ascending"), ("window", "ascending")])


def part_labels(
    part: pa.Table, stages: dict[str, pa.Table], acfg: AnnotateConfig, gold_answers: dict[str, list[str]] | None
) -> pa.Table:
    """labels.parquet's rows for a chain part's queries (build_labels, per part)."""
    cols = {c: part.column(c).to_pylist() for c in ["query_id", "all_pool", "human", "judged", "judged_grades"]}
    inputs = TargetInputs(
        pools={q: pool for q, pool in zip(cols["query_id"], cols["all_pool"])},
        human={q: set(h) for q, h in zip(cols["query_id"], cols["human"])},
        human_grades={q: dict(zip(d, g)) for q, d, g in zip(cols["query_id"], cols["judged"], cols["judged_grades"])},
        queries={},
        passages={},
        cut=set(),
    )
    return build_labels(inputs, stages, inputs.pools, acfg, gold_answers)


class StageTally:
    """A stage's summary, added up one part at a time."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.parse_status: Counter = Counter()
        self.finish_reasons: Counter = Counter()
        self.skipped: Counter = Counter()

    def add(self, table: pa.Table, run: str, part: pa.Table) -> None:
        c = self.counts
        c["rows"] += table.num_rows
        c["queries"] += pc.count_distinct(table.column("query_id")).as_py() if table.num_rows else 0
        new_queries = pc.equal(part.column("run"), run)
        new_ids = pc.filter(part.column("query_id"), new_queries)
        c["new_rows"] += pc.sum(pc.is_in(table.column("query_id"), new_ids)).as_py() or 0
        for name in ("invalid_ids", "repeated_ids", "passages_cut", "prompt_tokens", "output_tokens", "cached_tokens"):
            c[name] += pc.sum(table.column(name)).as_py() or 0
        self.parse_status.update(table.column("parse_status").to_pylist())
        self.finish_reasons.update(table.column("finish_reason").to_pylist())

    def summary(self, wall_s: float, engine_s: float | None) -> dict:
        c = self.counts
        n, queries = c["rows"], c["queries"]
        whole = engine_s if c["new_rows"] == n and engine_s else None
        return {
            "rows": n,
            "queries": queries,
            "new_rows": c["new_rows"],
            "resumed_rows": n - c["new_rows"],
            "duplicates_dropped": 0,
            "parse_status": dict(self.parse_status),
            "parse_failure_rate": round(1 - self.parse_status.get("ok", 0) / n, 4) if n else 0.0,
            "finish_reasons": dict(self.finish_reasons),
            "invalid_ids": c["invalid_ids"],
            "repeated_ids": c["repeated_ids"],
            "passages_cut": c["passages_cut"],
            "prompt_tokens": c["prompt_tokens"],
            "output_tokens": c["output_tokens"],
            "prompt_tokens_per_query": round(c["prompt_tokens"] / queries, 1) if queries else 0.0,
            "prefix_cache_hit_rate": round(c["cached_tokens"] / c["prompt_tokens"], 4) if c["prompt_tokens"] else 0.0,
            "wall_s": round(wall_s, 1),
            "generate_s": round(engine_s, 1) if engine_s else None,
            "tokens_per_s": round((c["prompt_tokens"] + c["output_tokens"]) / whole, 1) if whole else None,
            "queries_per_s": round(queries / whole, 4) if whole else None,
            "skipped_queries": dict(self.skipped),
        }


# --------------------------------------------------------------------------- 1. inputs
def ensure_inputs(
    out: str,
    fp: str,
    paths: dict[str, str],
    acfg: AnnotateConfig,
    wanted: list[str] | None,
    label: str,
    connect: Callable[[], None] = lambda: None,
) -> dict:
    """``<out>/inputs`` for fingerprint ``fp`` (built, or reused if already complete). ``connect``:
    called before Ray is needed (a reuse needs no cluster)."""
    step = store.SideStep.at(store.join(out, "inputs.meta"), fp)
    reused = step.reusable()
    if reused is not None:
        return reused
    connect()
    t0 = time.time()
    step.begin()
    counts = prepare_inputs(paths["pools"], paths["queries"], paths["corpus"], out, acfg, wanted)
    log.info(f"{label}: inputs of {counts['queries']:,} queries written ({time.time() - t0:.0f}s)")
    return step.finish(**counts)


def write_inputs(out: str, fp: str, rows: pa.Table, label: str, rows_per_file: int = 1_000) -> dict:
    """``<out>/inputs`` from rows its caller built (INPUT_SCHEMA; the RAG stage: one per question and
    setting), in files of ``rows_per_file`` rows; reused while ``fp`` holds."""
    step = store.SideStep.at(store.join(out, "inputs.meta"), fp)
    reused = step.reusable()
    if reused is not None:
        return reused
    step.begin()
    inputs = store.join(out, "inputs")
    store.remove(inputs)
    for j, start in enumerate(range(0, rows.num_rows, rows_per_file)):
        part = rows.slice(start, rows_per_file)
        part = part.set_column(part.schema.get_field_index("part"), "part", pa.array([j] * part.num_rows, pa.int32()))
        write_atomic(part.cast(INPUT_SCHEMA), store.join(inputs, f"part-{j:05d}.parquet"))
    log.info(f"{label}: inputs of {rows.num_rows:,} queries written")
    return step.finish(queries=rows.num_rows)


def sample_queries(pools_path: str, k: int | None, seed: str) -> list[str] | None:
    """annotate.targets[].max_queries: a seeded subset of the pools' queries (small runs only: the ids
    of all queries are read for it)."""
    if k is None:
        return None
    fs, path = store.filesystem(pools_path)
    ids = pc.unique(pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=["query_id"])["query_id"])
    qids = sorted(ids.to_pylist())
    return sorted(random.Random(seed).sample(qids, k)) if k < len(qids) else None


def graded_sample(inputs: str, k: int | None, seed: str) -> list[str] | None:
    """annotate.graded_queries: the seeded subset of the annotated queries the judge sees; null: all."""
    if k is None:
        return None
    table = read_columns(inputs, ["query_id", "annotate"])
    qids = sorted(pc.filter(table["query_id"], table["annotate"]).to_pylist())
    return sorted(random.Random(seed).sample(qids, k)) if k < len(qids) else None


# --------------------------------------------------------------------------- 2. the chain
def expected_by_part(inputs: str) -> dict[int, int]:
    """Input file number -> its queries to annotate."""
    table = read_columns(inputs, ["part", "annotate"])
    counts = table.filter(table["annotate"]).group_by("part").aggregate([("annotate", "count")])
    return dict(zip(counts["part"].to_pylist(), counts["annotate_count"].to_pylist()))


def resume_plan(inputs: str, parts: str) -> tuple[list[str], pa.Array, int, int, int]:
    """(input files still to read, finished ids inside them, queries expected, done, bytes of the
    driver's done-structure). Only the ids of partly finished files are kept."""
    expected = expected_by_part(inputs)
    done = read_columns(parts, ["query_id", "part"]) if parquet_files(parts) else None
    done_by_part: dict[int, int] = {}
    if done is not None and done.num_rows:
        counts = done.group_by("part").aggregate([("query_id", "count")])
        done_by_part = dict(zip(counts["part"].to_pylist(), counts["query_id_count"].to_pylist()))
    files = []
    partial: list[int] = []
    for name in parquet_files(inputs):
        j = int(posixpath.basename(name)[len("part-") : -len(".parquet")])
        if done_by_part.get(j, 0) >= expected.get(j, 0):
            continue  # every query of this file is in the parts (or it has none to annotate)
        files.append(name)
        if done_by_part.get(j):
            partial.append(j)
    ids = pa.array([], pa.string())
    size = 0
    if done is not None and partial:
        ids = pc.filter(done["query_id"], pc.is_in(done["part"], pa.array(partial, pa.int32()))).combine_chunks()
    if done is not None:
        size = done.nbytes
    return files, ids, sum(expected.values()), sum(done_by_part.values()), size


def keep_todo(batch: pa.Table, done: pa.Array) -> pa.Table:
    """The queries of an input batch still to annotate."""
    keep = batch["annotate"]
    if len(done):
        keep = pc.and_(keep, pc.invert(pc.is_in(batch["query_id"], done)))
    return batch.filter(keep)


def check_parts(parts: str, expected: int, label: str) -> int:
    """Exactly once: as many parts rows as expected queries, each query once."""
    ids = read_columns(parts, ["query_id"])["query_id"]
    count, unique = len(ids), pc.count_distinct(ids).as_py() if len(ids) else 0
    if not count == unique == expected:
        raise AnnotateError(
            f"{label}: the chain's parts hold {count:,} rows for {unique:,} queries, expected {expected:,} "
            f"({parts}); rerun to finish the missing ones"
        )
    return count


def fault_injection(out: str) -> dict:
    """Test-only fault injection (environment, never a config): a replica dies once at the start of its
    Nth block, or once in its Nth block after the first stages ran (half done); or every block waits
    a number of seconds first, its engine ready (a chain that surely outlasts Ray Data's 30 s detector
    rounds; a moment to kill an engine mid-job), and says so in a marker file."""
    folder = out if not store.is_remote(out) else tempfile.gettempdir()
    fail: dict[str, Any] = {}
    if os.environ.get("UTILRAG_FAULT_ANNOTATE_FAIL_AFTER_BATCHES"):
        fail["after_batches"] = int(os.environ["UTILRAG_FAULT_ANNOTATE_FAIL_AFTER_BATCHES"])
        fail["marker"] = os.path.join(folder, ".chain.crashed")
    if os.environ.get("UTILRAG_FAULT_ANNOTATE_FAIL_MID_BLOCK"):
        fail["mid_block"] = int(os.environ["UTILRAG_FAULT_ANNOTATE_FAIL_MID_BLOCK"])
        fail["mid_block_marker"] = os.path.join(folder, ".chain.midblock.crashed")
    if os.environ.get("UTILRAG_FAULT_ANNOTATE_BLOCK_DELAY_S"):
        fail["block_delay_s"] = float(os.environ["UTILRAG_FAULT_ANNOTATE_BLOCK_DELAY_S"])
        fail["delay_marker"] = os.path.join(folder, ".chain.block-waiting")  # a block waits now
    return fail


def run_chain(
    out: str,
    fp: str,
    acfg: AnnotateConfig,
    model_path: str,
    label: str,
    graded_ids: list[str] | None,
    run: str,
    engine_factory: Callable | None = None,
    connect: Callable[[], None] = lambda: None,
) -> dict:
    """Annotate every unfinished query of ``<out>/inputs`` into ``<out>/chain.parts``; returns run stats.
    ``connect``: called before Ray is needed (a complete chain needs no cluster)."""
    inputs, parts = store.join(out, "inputs"), store.join(out, "chain.parts")
    step = store.SideStep.at(store.join(out, "chain.meta"), fp)
    old = step.reusable(parts)
    if old is not None:
        log.info(f"{label}: the chain is complete ({old.get('queries', 0):,} queries), reusing {parts}")
        return {"engine_s": None, "replicas": {}, "queries": old.get("queries", 0)}
    clear_parts(parts, step.changed, label)
    step.begin()
    files, done_ids, expected, done, done_bytes = resume_plan(inputs, parts)
    if done:
        log.info(
            f"{label}: resuming: {done:,} of {expected:,} queries already done, {expected - done:,} to go "
            f"(driver: {done_bytes / 2**20:.1f} MiB of done ids read, {len(done_ids):,} kept)"
        )
    stats: dict = {"engine_s": None, "replicas": {}, "queries": expected}
    if files and expected > done:
        connect()
        stats = _annotate(
            files, done_ids, parts, acfg, model_path, label, graded_ids, run, expected, done, out, engine_factory
        )
        stats["queries"] = expected
    check_parts(parts, expected, label)
    step.finish(queries=expected)
    return stats


def _annotate(
    files: list[str],
    done_ids: pa.Array,
    parts: str,
    acfg: AnnotateConfig,
    model_path: str,
    label: str,
    graded_ids: list[str] | None,
    run: str,
    expected: int,
    done: int,
    out: str,
    engine_factory: Callable | None,
) -> dict:
    import ray

    columns = [n for n in INPUT_SCHEMA.names if n != "rejects"]
    ds = read_parquet_tasks(files, columns)
    ds = ds.map_batches(udf(keep_todo), batch_format="pyarrow", fn_kwargs={"done": done_ids})
    # Tasks sized to blocks: an input file (~1,000 queries) would be one replica task whose output
    # reaches Ray Data only when it ends (35-70 min on an A100 replica: past Ray Data's no-progress
    # guard), and a retry would redo all of it. A streaming repartition makes every task one block.
    ds = ds.repartition(target_num_rows_per_block=acfg.scale.batch_size)
    # The async replica runs blocks as coroutines (at most scale.blocks_per_replica at once, see
    # AsyncChainAnnotator) and holds one more task, so no task boundary drains it; the sync one runs
    # one block at a time. Bounded: a replica lost takes at most this many blocks in flight with it.
    in_flight = acfg.scale.blocks_per_replica + 1 if acfg.engine.async_engine else 1
    ds = ds.map_batches(
        AsyncChainAnnotator if acfg.engine.async_engine else ChainAnnotator,
        batch_size=acfg.scale.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs=dict(
            model=model_path,
            engine=engine_kwargs(acfg),
            acfg=acfg,
            parts=parts,
            run=run,
            graded_ids=graded_ids,
            fail=fault_injection(out),
            engine_factory=engine_factory,
        ),
        compute=ray.data.ActorPoolStrategy(
            min_size=acfg.scale.replicas[0],
            max_size=acfg.scale.replicas[1],
            max_concurrent_calls_per_actor=in_flight if acfg.engine.async_engine else None,
            max_tasks_in_flight_per_actor=in_flight,
        ),
        **actor_resources(acfg),
    )
    # Ray Data's no-progress guard: the first output waits for GPU nodes and a model load (see the config)
    ds.context.execution_no_progress_timeout_s = acfg.scale.no_progress_timeout_s
    # A replica whose engine fails to start raises in its constructor; Ray Data replaces it this many
    # times in a row (its default, 0, fails the job at the first) before failing with that error.
    ds.context.max_consecutive_actor_init_deaths = acfg.scale.engine_start_retries
    compress_ray_data_clock(ds.context)
    replicas: dict[int, dict] = {}  # pid -> engine starts seen, busy and alive seconds (counters only)
    rows, tokens = 0, 0
    t0 = last = time.time()
    first_ready = None
    engine = acfg.engine
    gpus = acfg.scale.replicas[1] * engine.tensor_parallel_size * engine.pipeline_parallel_size if engine.use_gpu else 0
    watch = PartsWatch(parts, label, done, expected, gpus, acfg.scale.progress_every_s)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows += int(batch["rows"].sum())
            tokens += int(batch["tokens"].sum())
            for pid, ready, busy, alive, fill in zip(
                batch["pid"], batch["ready_at"], batch["busy_s"], batch["alive_s"], batch["fill"]
            ):
                replica = replicas.setdefault(int(pid), {"starts": set(), "busy_s": 0.0, "alive_s": 0.0, "fill": {}})
                replica["starts"].add(float(ready))
                replica["busy_s"] = max(replica["busy_s"], float(busy))
                replica["alive_s"] = max(replica["alive_s"], float(alive))
                fill = json.loads(str(fill))  # cumulative in the process: the latest has the most steps
                if fill.get("steps", 0) >= replica["fill"].get("steps", 0):
                    replica["fill"] = fill
                first_ready = float(ready) if first_ready is None else min(first_ready, float(ready))
            now = time.time()
            if now - last >= acfg.scale.progress_every_s:
                last = now
                rate = tokens / max(now - (first_ready or t0), 1e-9)
                log.info(f"{label}: finished tasks: {rows:,} requests, {tokens:,} tokens, {rate:,.0f} tokens/s")
    except AnnotateError:
        raise
    except Exception as e:  # noqa: BLE001 -- Ray wraps the engine's error; surface the engine's words
        raise engine_failure(label, e) from None
    finally:
        watch.stop()
    for replica in replicas.values():
        replica["starts"] = len(replica["starts"])
    return {"engine_s": (time.time() - first_ready) if first_ready else None, "replicas": replicas}


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m, 3h05m, 2d17h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class PartsWatch:
    """Progress while the chain runs, from the parts written (a part is written when its block ends,
    before its Ray Data task hands its stats over), so a thread lists the parts every ``every_s``
    seconds, reads each new part's row count from its footer once, and logs queries done/total, the
    rate since this run started, the ETA and the GPU-hours so far (the pool at its largest)."""

    def __init__(self, parts: str, label: str, done: int, expected: int, gpus: int, every_s: float):
        import threading

        self.parts, self.label, self.expected, self.gpus, self.every_s = parts, label, expected, gpus, every_s
        self.seen = set(self._names())
        self.done = self.start = done
        self.t0 = time.time()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="annotate-progress", daemon=True)
        self.thread.start()

    def _names(self) -> list[str]:
        try:
            return [n for n in store.list_names(self.parts) if n.startswith("part-") and n.endswith(".parquet")]
        except Exception:  # noqa: BLE001 -- progress only: a failed listing is skipped
            return []

    def count(self) -> None:
        for name in self._names():
            if name in self.seen:
                continue
            try:
                fs, path = store.filesystem(store.join(self.parts, name))
                self.done += pq.read_metadata(path, filesystem=fs).num_rows
                self.seen.add(name)
            except Exception:  # noqa: BLE001 -- not readable yet (object storage): the next round
                pass

    def line(self) -> str:
        elapsed = time.time() - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        left = self.expected - self.done
        eta = duration(left / rate) if rate > 0 else "unknown (no query finished yet)"
        share = self.done / self.expected if self.expected else 1.0
        gpus = f", {elapsed * self.gpus / 3600:,.2f} GPU-hours so far ({self.gpus} GPUs)" if self.gpus else ""
        return (
            f"{self.label}: queries {self.done:,}/{self.expected:,} ({share:.1%}), {rate:,.2f} queries/s, "
            f"ETA {eta}, {duration(elapsed)} elapsed{gpus}"
        )

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.count()
            log.info(self.line())

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- 3. tables, labels, report
def write_rejects(inputs: str, location: str) -> tuple[int, int, int]:
    """rejects.parquet from the inputs' reject lists; returns (queries to annotate, rejects, passages cut)."""
    stream = ParquetStream(location, REJECTS_SCHEMA)
    annotated = cut = 0

    def read(name: str) -> pa.Table:
        fs, path = store.filesystem(name)
        return pq.read_table(path, columns=["query_id", "annotate", "cut", "rejects"], filesystem=fs)

    for table in prefetched(read, parquet_files(inputs), read_window(inputs)):
        lists = table["rejects"].combine_chunks()
        flat = pc.list_flatten(lists)
        doc_ids, reasons = flat.flatten()
        stream.write(
            pa.Table.from_arrays(
                [table["query_id"].take(pc.list_parent_indices(lists)).combine_chunks(), doc_ids, reasons],
                schema=REJECTS_SCHEMA,
            )
        )
        annotated += pc.sum(table["annotate"]).as_py() or 0
        cut += pc.sum(pc.list_flatten(table["cut"])).as_py() or 0
    stream.close()
    return annotated, stream.rows, cut


ERRORS_SCHEMA = pa.schema([("query_id", pa.string()), ("stage", pa.string()), ("reason", pa.string())])


def finalize(
    out: str,
    labels_path: str | None,
    errors_path: str,
    acfg: AnnotateConfig,
    run: str,
    gold_answers: dict[str, list[str]] | None = None,
) -> tuple[dict[str, StageTally], ReportTally, int, Counter]:
    """The stage tables, labels and error rows from the chain's parts, one part at a time; returns the
    tallies, the label rows and the error rows by stage. An error row's query has no labels.
    ``labels_path`` None: no labels (the RAG stage's answers are no judgments). ``gold_answers``: what the
    QA-metric stage's answers are scored against."""
    stages: list[str] = [s for s in STAGE_ORDER if s in acfg.chain_stages()]
    streams = {s: ParquetStream(store.join(out, f"{s}.parquet"), STAGE_SCHEMA) for s in stages}
    labels = ParquetStream(labels_path, LABELS_SCHEMA) if labels_path else None
    errors = ParquetStream(errors_path, ERRORS_SCHEMA)
    errors_by_stage: Counter = Counter()
    tallies = {s: StageTally() for s in stages}
    report = ReportTally()

    def read(name: str) -> pa.Table:
        fs, path = store.filesystem(name)
        return pq.read_table(path, schema=CHAIN_SCHEMA, filesystem=fs)

    parts = store.join(out, "chain.parts")
    for part in prefetched(read, parquet_files(parts), read_window(parts)):
        failed = pc.is_valid(part["error_stage"])
        if pc.any(failed).as_py():
            bad = part.filter(failed)
            errors.write(pa.table([bad["query_id"], bad["error_stage"], bad["error"]], schema=ERRORS_SCHEMA))
            errors_by_stage.update(bad["error_stage"].to_pylist())
            part = part.filter(pc.invert(failed))
        tables = {s: explode(part, s) for s in stages}
        skipped = Counter(r for r in part["skipped"].to_pylist() if r)
        for s in stages:
            streams[s].write(tables[s])
            tallies[s].add(tables[s], run, part)
            for reason, n in skipped.items():
                if s in SKIPS and reason in SKIPS[s]:
                    tallies[s].skipped[reason] += n
        if labels is not None:
            rows = part_labels(part, tables, acfg, gold_answers)
            labels.write(rows)
            report.add(rows, shown_positions(tables["relsel"]) if "relsel" in tables else None)
    for stream in streams.values():
        stream.close()
    if labels is not None:
        labels.close()
    errors.close()
    return tallies, report, labels.rows if labels is not None else 0, errors_by_stage


def stage_summaries(tallies: dict[str, StageTally], wall_s: float, engine_s: float | None) -> dict[str, dict]:
    """Per stage summaries. The stages share one engine and one wall time: each stage gets the share of
    both in proportion to its tokens, so sums over stages (the run report's) stay the chain's times."""
    tokens = {s: t.counts["prompt_tokens"] + t.counts["output_tokens"] for s, t in tallies.items()}
    total = sum(tokens.values())
    out = {}
    for s, t in tallies.items():
        share = tokens[s] / total if total else 1 / max(len(tallies), 1)
        out[s] = t.summary(wall_s * share, engine_s * share if engine_s else None)
        out[s]["time_share_of_chain"] = round(share, 4)
    return out


def replica_figures(stats: dict) -> dict:
    """engine starts per replica process and the engines' idle share, from the replicas' counters."""
    replicas = stats.get("replicas") or {}
    if not replicas:
        return {}
    alive = sum(r["alive_s"] for r in replicas.values())
    busy = sum(r["busy_s"] for r in replicas.values())
    return {
        "replicas": len(replicas),
        "engine_starts_per_replica": round(float(np.mean([r["starts"] for r in replicas.values()])), 2),
        # Seconds with at least one request in flight: one request counts as busy (see engine_fill).
        "engine_idle_fraction": round(1 - busy / alive, 4) if alive else None,
        **fill_figures([r["fill"] for r in replicas.values() if r.get("fill")]),
    }


def over_error_budget(
    label: str, error_rows: int, total: int, max_fraction: float, errors_path: str, key: str
) -> str | None:
    """The one line failing a chain job with more error rows than ``max_fraction`` of ``total`` (the
    config ``key``, as ingest's reject threshold); None within it."""
    share = error_rows / total if total else 0.0
    if share <= max_fraction:
        return None
    return (
        f"{label}: {error_rows:,} of {total:,} queries are error rows ({share:.3%}), above {key} "
        f"{max_fraction:.3%}; see {errors_path}"
    )


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]
