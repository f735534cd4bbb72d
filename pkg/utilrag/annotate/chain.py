"""Job B's replica: one engine runs every stage of a block of queries, and writes the block atomically.

A block (``scale.batch_size`` queries) goes through three generate waves on the same engine, each
wave one ``generate`` call mixing stages (per-request sampling):

1. RelSel windows (and the prompts that need nothing earlier: the graded judge's, the QA-metric
   baseline's answers, querygen's questions, the RAG stage's answers);
2. the pseudo-answer of each query RelSel chose something for;
3. UtilSel and UtilRank windows over the RelSel choice, with the answer.

The block's result, one CHAIN_SCHEMA row per query with every stage's rows, is written as one Parquet
part named by the block's query ids (a retried task skips a block whose part exists), so a block's rows
land all at once or not at all. The stage tables and labels are cut out of these parts afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from utilrag.annotate import prompts
from utilrag.annotate.engine import EngineFill
from utilrag.annotate.prompts import PROMPT_VERSION
from utilrag.annotate.stages import STAGE_ORDER, STAGE_SCHEMA, parse_output, windows
from utilrag.config import QA_METRIC_STAGE, QUESTION_STAGE, RAG_STAGE, AnnotateConfig

STAGE_ROW = pa.struct([f for f in STAGE_SCHEMA if f.name != "query_id"])
CHAIN_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("part", pa.int32()),  # the input file the query came from (resume skips finished files)
        ("run", pa.string()),  # the run that wrote it (new vs resumed rows)
        ("skipped", pa.string()),  # why answer / UtilSel / UtilRank were not asked; null: they were
        ("error_stage", pa.string()),  # an error row: the stage whose requests kept failing; null: none did
        ("error", pa.string()),  # ... and why (no stage rows then)
        ("all_pool", pa.list_(pa.string())),
        ("human", pa.list_(pa.string())),
        ("judged", pa.list_(pa.string())),
        ("judged_grades", pa.list_(pa.int32())),
        *[(stage, pa.list_(STAGE_ROW)) for stage in STAGE_ORDER],
    ]
)
STATS_SCHEMA = ["queries", "rows", "tokens", "pid", "ready_at", "busy_s", "alive_s", "engine_starts", "fill"]
WAVES = (("relsel", "graded", QA_METRIC_STAGE, QUESTION_STAGE, RAG_STAGE), ("answer",), ("utilsel", "utilrank"))


@dataclass
class Request:
    query: int  # row of the block
    stage: str
    window: int
    doc_ids: list[str]
    messages: list[dict]
    passages_cut: int


def stage_sampling(stage: str, acfg: AnnotateConfig) -> dict:
    from utilrag.annotate.engine import sampling_kwargs
    from utilrag.annotate.stages import stage_regex

    if stage == QA_METRIC_STAGE:  # the generator's short answer, greedy as RAG's: its score is the label
        return {"temperature": 0.0, "top_p": 1.0, "max_tokens": acfg.qametric.max_tokens, "seed": acfg.sampling.seed}
    max_tokens = acfg.sampling.answer_max_tokens if stage in ("answer", RAG_STAGE) else acfg.sampling.max_tokens
    return sampling_kwargs(acfg, max_tokens, stage_regex(stage))


PROMPT_VERSIONS = {
    QUESTION_STAGE: prompts.QUESTION_PROMPT_VERSION,
    RAG_STAGE: prompts.RAG_PROMPT_VERSION,
    QA_METRIC_STAGE: prompts.RAG_PROMPT_VERSION,
}


def row_meta(stage: str, acfg: AnnotateConfig) -> dict:
    sampling = stage_sampling(stage, acfg)
    return {
        "model": acfg.model,
        "prompt_version": PROMPT_VERSIONS.get(stage, PROMPT_VERSION),
        "constrained": bool(acfg.sampling.constrained),
        "sampling": json.dumps({k: v for k, v in sampling.items() if k != "regex"}, sort_keys=True),
    }


class BlockState:
    """One block's queries and what each stage returned so far."""

    def __init__(self, block: list[dict], acfg: AnnotateConfig, graded_ids: set[str] | None):
        self.rows = block
        self.acfg = acfg
        self.graded_ids = graded_ids
        self.results: list[dict[str, list[dict]]] = [{} for _ in block]
        self.skipped: list[str | None] = [None] * len(block)
        self.errors: list[tuple[str, str] | None] = [None] * len(block)

    def fail(self, i: int, stage: str, reason: str) -> None:
        """Query ``i`` becomes an error row: no stage rows, the stage and the reason instead."""
        self.results[i] = {}
        self.skipped[i] = None
        self.errors[i] = (stage, reason)

    def _request(self, i: int, stage: str, window: int, ids: list[str], build: Callable) -> Request:
        row = self.rows[i]
        text = dict(zip(row["doc_ids"], row["passages"]))
        cut = dict(zip(row["doc_ids"], row["cut"]))
        messages = prompts.arrange(build([text[d] for d in ids]), self.acfg.layout)
        return Request(i, stage, window, ids, messages, sum(bool(cut[d]) for d in ids))

    def requests(self, wave: tuple[str, ...]) -> list[Request]:
        """The requests of one wave, given the earlier waves' results (stages not asked for: none)."""
        return [r for i in range(len(self.rows)) for r in self.query_requests(i, wave)]

    def query_requests(self, i: int, wave: tuple[str, ...]) -> list[Request]:
        """Query ``i``'s requests of one wave, given its earlier waves' results."""
        row = self.rows[i]
        return [
            r
            for s in wave
            if s in self.acfg.chain_stages()
            for r in self._stage_requests(i, s, row["query"], row["doc_ids"])
        ]

    def _stage_requests(self, i: int, stage: str, query: str, pool: list[str]) -> list[Request]:
        size = self.acfg.window
        if stage == "relsel":
            return [
                self._request(i, stage, w, ids, lambda p: prompts.relsel_messages(query, p))
                for w, ids in enumerate(windows(pool, size))
            ]
        if stage == RAG_STAGE:  # the RAG generator over the query's own passages (none: closed book)
            return [self._request(i, stage, 0, list(pool), lambda p: prompts.rag_messages(query, p))]
        if stage == QA_METRIC_STAGE:  # the QA-metric baseline: the RAG prompt over one pool passage at a time
            return [
                self._request(i, stage, position, [d], lambda p: prompts.rag_messages(query, p))
                for position, d in enumerate(pool)
            ]
        if stage == QUESTION_STAGE:  # querygen: a question per passage; its "query" text is the prompt variant
            variant = int(query)
            return [
                self._request(i, stage, position, [d], lambda p: prompts.question_messages(p[0], variant))
                for position, d in enumerate(pool)
            ]
        if stage == "graded":
            if self.graded_ids is not None and self.rows[i]["query_id"] not in self.graded_ids:
                return []
            return [
                self._request(i, stage, position, [d], lambda p: prompts.graded_messages(query, p[0]))
                for position, d in enumerate(pool)
            ]
        chosen_set = {d for r in self.results[i].get("relsel", []) for d in r["selected"] or []}
        chosen = [d for d in pool if d in chosen_set]
        if not chosen:
            self.skipped[i] = "no_relsel_positive"
            return []
        if stage == "answer":
            return [self._request(i, stage, 0, chosen, lambda p: prompts.answer_messages(query, p))]
        answers = [r["answer"] for r in self.results[i].get("answer", []) if r["answer"]]
        if not answers:
            self.skipped[i] = "no_pseudo_answer"
            return []
        build = prompts.utilsel_messages if stage == "utilsel" else prompts.utilrank_messages
        return [
            self._request(i, stage, w, ids, lambda p, build=build: build(query, p, answers[0]))
            for w, ids in enumerate(windows(chosen, size))
        ]

    def record(self, requests: list[Request], outputs: dict[str, list[Any]], meta: dict[str, dict]) -> None:
        """Parse a wave's outputs into stage rows (in request order: windows ascending)."""
        for k, r in enumerate(requests):
            raw, reason = outputs["raw_output"][k], outputs["finish_reason"][k]
            row = {
                "window": r.window,
                "doc_ids": r.doc_ids,
                "raw_output": raw,
                "prompt_tokens": outputs["prompt_tokens"][k],
                "output_tokens": outputs["output_tokens"][k],
                "cached_tokens": outputs["cached_tokens"][k],
                "finish_reason": reason,
                "passages_cut": r.passages_cut,
                **parse_output(r.stage, raw, r.doc_ids, reason),
                **meta[r.stage],
            }
            self.results[r.query].setdefault(r.stage, []).append(row)

    def table(self, run: str) -> pa.Table:
        cols: dict[str, list[Any]] = {name: [] for name in CHAIN_SCHEMA.names}
        for i, row in enumerate(self.rows):
            error_stage, error = self.errors[i] or (None, None)
            values = {
                **{k: row[k] for k in ("query_id", "part", "all_pool", "human", "judged", "judged_grades")},
                "run": run,
                "skipped": self.skipped[i],
                "error_stage": error_stage,
                "error": error,
                **{stage: self.results[i].get(stage, []) for stage in STAGE_ORDER},
            }
            for name in CHAIN_SCHEMA.names:
                cols[name].append(values[name])
        return pa.table(cols, schema=CHAIN_SCHEMA)


def part_name(query_ids: list[str]) -> str:
    """The same block always gets the same name: a retry overwrites, never adds."""
    digest = hashlib.sha1("\n".join(sorted(query_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


class RequestsFailed(Exception):
    """A wave's requests raised: the stage(s) they were for, and the engine's error as ``__cause__``."""

    def __init__(self, stages: list[str], cause: BaseException):
        self.stage = "+".join(sorted(set(stages)))
        self.reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:500]  # one line
        super().__init__(f"{self.stage}: {self.reason}")


def run_block(
    block: pa.Table,
    generate: Callable[[list[Request]], dict[str, list[Any]]],
    acfg: AnnotateConfig,
    graded_ids: set[str] | None,
    run: str,
    after_wave: Callable[[int], None] | None = None,
) -> pa.Table:
    """Every asked stage of a block's queries; ``generate`` answers one wave's requests at once."""
    state = BlockState(block.to_pylist(), acfg, graded_ids)
    meta: dict[str, dict] = {stage: row_meta(stage, acfg) for stage in acfg.chain_stages()}
    for n, wave in enumerate(WAVES):
        requests = state.requests(wave)
        if requests:
            try:
                outputs = generate(requests)
            except Exception as e:
                raise RequestsFailed([r.stage for r in requests], e) from e
            state.record(requests, outputs, meta)
        if after_wave:
            after_wave(n)
    return state.table(run)


async def run_block_async(
    block: pa.Table,
    generate_one: Callable[[Request], Awaitable[dict[str, Any]]],
    acfg: AnnotateConfig,
    graded_ids: set[str] | None,
    run: str,
    after_wave: Callable[[int], None] | None = None,
) -> pa.Table:
    """run_block with every query on its own: a query's next wave starts when its own requests are
    done, while the block's other queries are anywhere in theirs. Same rows as run_block."""
    state = BlockState(block.to_pylist(), acfg, graded_ids)
    meta: dict[str, dict] = {stage: row_meta(stage, acfg) for stage in acfg.chain_stages()}

    async def one_query(i: int) -> None:
        for n, wave in enumerate(WAVES):
            requests = state.query_requests(i, wave)
            if requests:
                try:
                    outputs = await all_or_none([generate_one(r) for r in requests])
                except Exception as e:
                    raise RequestsFailed([r.stage for r in requests], e) from e
                state.record(requests, {k: [o[k] for o in outputs] for k in outputs[0]}, meta)
                if after_wave:
                    after_wave(n)

    await all_or_none([one_query(i) for i in range(len(state.rows))])
    return state.table(run)


async def all_or_none(coroutines: list[Awaitable[Any]]) -> list[Any]:
    """asyncio.gather that cancels the others when one fails: a failed block must not leave its other
    queries running on the engine (and writing nothing) while Ray retries it."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def is_engine_death(error: BaseException | None) -> bool:
    """vLLM's EngineDeadError anywhere in the error's chain (its EngineCore process is gone)."""
    while error is not None:
        if type(error).__name__ == "EngineDeadError":
            return True
        error = error.__cause__ or error.__context__
    return False


class Tries:
    """Engine deaths per block, per query and per replica, kept beside the parts: a replica that dies
    takes its own counters with it, and the restarted one (maybe on another node) reads them here.
    Only engine deaths are counted, not node losses: a lost node is no query's fault."""

    def __init__(self, parts: str):
        from utilrag import store

        self.folder = store.join(parts, ".tries")

    def _location(self, key: str) -> str:
        from utilrag import store

        return store.join(self.folder, f"{key}.json")

    def get(self, key: str) -> dict:
        from utilrag import store

        return store.read_json(self._location(key)) or {"deaths": 0}

    def get_deaths(self, key: str, stage: str = "", reason: str = "") -> int:
        """The deaths counted for ``key`` (``died``'s signature, counting nothing)."""
        return int(self.get(key)["deaths"])

    def died(self, key: str, stage: str, reason: str) -> int:
        from utilrag import store

        deaths = self.get(key)["deaths"] + 1
        store.write_text(self._location(key), json.dumps({"deaths": deaths, "stage": stage, "reason": reason}))
        return deaths


def query_key(query_id: str) -> str:
    return "query-" + hashlib.sha1(query_id.encode()).hexdigest()[:20]


def start_reaper(exclude: set[int]) -> Any:
    """reaper.py watching this process: it kills the engine's processes if this one dies without
    stopping them (SIGKILL, OOM), so none holds the GPU after its replica is gone. ``exclude``: the
    children this process had before its engine (left alone)."""
    import subprocess
    import sys

    from utilrag.annotate import reaper

    return subprocess.Popen(
        [sys.executable, reaper.__file__, str(os.getpid()), *map(str, sorted(exclude))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the replica's process group: a group kill must not take it along
    )


def actor_id() -> str | None:
    """This process's Ray actor id (kept across Ray's restarts of the actor); None outside an actor
    (benchmarks and tests call the replica directly)."""
    import ray

    return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None


class QueryTries:
    """The tries of one query run alone: iterate to try again (while tries are left; its engine deaths
    in earlier replicas count), ``failed`` after a try that raised (the replica exits there if its
    engine died), ``error_row`` when none is left."""

    def __init__(self, replica: ChainAnnotator, one: pa.Table):
        self.replica, self.one = replica, one
        query_id, self.tries, self.stage, self.reason = replica._earlier(one)
        self.key = query_key(query_id)

    def __iter__(self) -> Iterator[int]:
        while self.tries < self.replica.acfg.scale.query_tries:
            self.tries += 1
            self.replica.alone.add(self.key)  # an engine death now counts against this query too
            try:
                yield self.tries
            finally:
                self.replica.alone.discard(self.key)

    def failed(self, error: RequestsFailed) -> None:
        self.replica._on_failure(error, None)  # exits if the engine died
        self.stage, self.reason = error.stage, error.reason

    def error_row(self) -> pa.Table:
        return self.replica._error_row(self.one, self.stage, f"{self.tries} tries: {self.reason}")


class ChainAnnotator:
    """One replica (a Ray Data actor): the engine starts once, in ``__init__``; every call is one block.

    ``engine_factory(model, engine_kwargs)`` builds the engine (default: vLLM); the throughput
    benchmarks pass a stand-in. Returns one stats row per block (the driver only counts them).

    Failures, hardest first:
    - the engine does not start: the constructor raises; Ray Data replaces the replica up to
      ``scale.engine_start_retries`` times in a row, then fails the job with the engine's message;
    - the engine dies (EngineDeadError): the replica kills the engine's processes and exits, so Ray
      restarts it and retries its block; a replica whose engines died more than
      ``scale.engine_deaths_per_replica`` times fails the job instead;
    - a block that raised, or whose engine died ``scale.query_tries`` times, runs one query at a time:
      a query that fails ``scale.query_tries`` times (raised, or took its engine down) becomes an error
      row and the block is written without it;
    - a retried block whose part already exists (its task was retried after the part was written) is
      skipped."""

    def __init__(
        self,
        model: str,
        engine: dict,
        acfg: AnnotateConfig,
        parts: str,
        run: str,
        graded_ids: list[str] | None = None,
        fail: dict | None = None,
        engine_factory: Callable | None = None,
    ):
        from utilrag.annotate.engine import VLLMEngine

        self.started_at = time.time()
        self.acfg, self.parts, self.run = acfg, parts, run
        self.fail = fail or {}
        self.tries = Tries(parts)
        actor = actor_id()
        self.replica = "replica-" + hashlib.sha1((actor or f"pid{os.getpid()}").encode()).hexdigest()[:16]
        import psutil

        self.before = {child.pid for child in psutil.Process().children()}  # not the engine's
        # In a Ray actor only: a replica called in a driver (tests, benchmarks) dies with its driver.
        self.reaper = start_reaper(self.before) if actor else None
        self.engine = (engine_factory or VLLMEngine)(model, engine)
        self.engine.check()  # a start failure raises here: Ray Data's start budget applies (see above)
        self.graded_ids = set(graded_ids) if graded_ids is not None else None
        self.sampling: dict[str, Any] = {
            s: self.engine.sampling_params(stage_sampling(s, acfg)) for s in acfg.chain_stages()
        }
        self.calls = 0
        # The queries running alone now (their keys): several blocks share an async replica, and an
        # engine death is charged to every one of them (one in flight with a poisoned one is charged too:
        # it would take query_tries such coincidences to make it an error row).
        self.alone: set[str] = set()

    def _generate(self, requests: list[Request]) -> dict[str, list[Any]]:
        return self.engine.generate([r.messages for r in requests], [self.sampling[r.stage] for r in requests])

    def _after_wave(self, call: int) -> Callable[[int], None]:
        """Fault injection for tests: die in this replica's ``call``-th block with it half done (after
        its first stages ran, before its part is written)."""

        def check(wave: int) -> None:
            if self.fail.get("mid_block") == call and wave == 1:
                from utilrag.annotate.engine import crash_once

                crash_once(self.fail["mid_block_marker"])

        return check

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        call, block = self._begin(batch)
        if not call:
            return self._stats(batch.num_rows, 0, 0)
        self._delay()
        if not self._isolate(block):
            try:
                table = run_block(batch, self._generate, self.acfg, self.graded_ids, self.run, self._after_wave(call))
                return self._write(table)
            except RequestsFailed as e:
                self._on_failure(e, block)
        tables = []
        for i in range(batch.num_rows):
            one = batch.slice(i, 1)
            tables.append(self._one_query(one))
        return self._write(pa.concat_tables(tables))

    def _begin(self, batch: pa.Table) -> tuple[int, str]:
        """This block's number on this replica (1, 2, ...) and its part's name; 0: nothing to do (no
        query of the batch is left, or its part was written by an earlier try of this task)."""
        from utilrag import store
        from utilrag.annotate.engine import crash_once

        if batch.num_rows == 0:
            return 0, ""
        block = part_name(batch.column("query_id").to_pylist())
        if store.exists(store.join(self.parts, block)):
            return 0, block
        self.calls += 1
        if self.fail.get("after_batches") == self.calls:
            crash_once(self.fail["marker"])
        return self.calls, block

    def _delay(self) -> None:
        """Test-only (fault_injection): the block waits, and says so in a marker file; nothing otherwise."""
        if self.fail.get("block_delay_s"):
            with open(self.fail["delay_marker"], "a") as marker:
                marker.write(f"{os.getpid()}\n")
            time.sleep(self.fail["block_delay_s"])

    def _isolate(self, block: str) -> bool:
        """Run the block a query at a time: its engine died with it ``query_tries`` times already."""
        return self.tries.get(block.removesuffix(".parquet"))["deaths"] >= self.acfg.scale.query_tries

    def _on_failure(self, error: RequestsFailed, block: str | None) -> None:
        """Requests raised: if the engine is dead, count it and exit: Ray restarts this replica and
        retries the block. Else return (the block is then run a query at a time, or the query alone
        tried again). A death is counted for the block and the queries running alone; the replica's
        budget counts only a block's first death (later ones, and those of its queries alone, are the
        input's doing: a poisoned query costs the replica one death, a machine that kills engines one
        per block)."""
        if not self._engine_dead(error):
            return
        first = False
        if block:
            first = self.tries.died(block.removesuffix(".parquet"), error.stage, error.reason) == 1
        for key in list(self.alone):
            self.tries.died(key, error.stage, error.reason)
        deaths = (self.tries.died if first else self.tries.get_deaths)(self.replica, error.stage, error.reason)
        self._stop_engine()
        if deaths > self.acfg.scale.engine_deaths_per_replica:
            from utilrag.annotate.engine import AnnotateError

            raise AnnotateError(
                f"a replica's engine died {deaths} times (annotate.scale.engine_deaths_per_replica="
                f"{self.acfg.scale.engine_deaths_per_replica}); last: {error.reason}"
            ) from None
        os._exit(3)  # Ray restarts the replica and retries this block (a restart gets a fresh engine)

    def _engine_dead(self, error: BaseException) -> bool:
        dead = getattr(self.engine, "dead", None)
        return is_engine_death(error) or bool(dead() if callable(dead) else dead)

    def _stop_engine(self) -> None:
        """Kill the engine's processes (what runs under this replica since its engine started, the reaper aside)."""
        import psutil

        from utilrag.annotate.reaper import engine_processes

        reaper = {self.reaper.pid} if self.reaper else set()
        processes = engine_processes(psutil.Process(), self.before | reaper)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        # gone before this replica exits: its restart must find the GPU memory free
        psutil.wait_procs(processes, timeout=30)

    def _one_query(self, one: pa.Table) -> pa.Table:
        """One query alone, up to ``query_tries`` tries (its engine deaths in earlier replicas count);
        then an error row."""
        attempts = QueryTries(self, one)
        for _ in attempts:
            try:
                return run_block(one, self._generate, self.acfg, self.graded_ids, self.run)
            except RequestsFailed as e:
                attempts.failed(e)
        return attempts.error_row()

    def _earlier(self, one: pa.Table) -> tuple[str, int, str, str]:
        """A query's id, and the engine deaths with it in flight so far (tries used), their stage and reason."""
        query_id = one.column("query_id")[0].as_py()
        earlier = self.tries.get(query_key(query_id))
        reason = f"its engine died with it in flight: {earlier['reason']}" if earlier["deaths"] else ""
        return query_id, earlier["deaths"], earlier.get("stage", ""), reason

    def _error_row(self, one: pa.Table, stage: str, reason: str) -> pa.Table:
        state = BlockState(one.to_pylist(), self.acfg, self.graded_ids)
        state.fail(0, stage, reason)
        return state.table(self.run)

    def _write(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The block's part, written atomically under its queries' name; its counts for the driver."""
        from utilrag import store
        from utilrag.annotate.job import write_atomic

        query_ids = table.column("query_id").to_pylist()
        write_atomic(table, store.join(self.parts, part_name(query_ids)))
        lists = {stage: table.column(stage).to_pylist() for stage in STAGE_ORDER}
        rows = sum(len(v) for stage in STAGE_ORDER for v in lists[stage])
        tokens = sum(r["prompt_tokens"] + r["output_tokens"] for stage in STAGE_ORDER for v in lists[stage] for r in v)
        return self._stats(len(query_ids), rows, tokens)

    def _stats(self, queries: int, rows: int, tokens: int) -> dict[str, np.ndarray]:
        """One row per block: what the driver counts (never the block's rows themselves)."""
        stats = {
            "queries": queries,
            "rows": rows,
            "tokens": tokens,
            "pid": os.getpid(),
            "ready_at": self.engine.ready_at,
            "busy_s": self.engine.busy() if hasattr(self.engine, "busy") else self.engine.busy_s,
            "alive_s": time.time() - self.engine.ready_at,
            "engine_starts": self.engine.starts,
            "fill": json.dumps(EngineFill.totals()),  # cumulative, this process's engine (empty: no stats)
        }
        return {k: np.array([v]) for k, v in stats.items()}


class AsyncChainAnnotator(ChainAnnotator):
    """ChainAnnotator on vLLM's AsyncLLM: ``__call__`` is a coroutine, so Ray Data runs several blocks
    on one replica at once (at most ``scale.blocks_per_replica``) and each query of a block moves on to
    its next stage as soon as its own requests are done. The engine is never drained between waves or
    blocks while there is work; a block's part is still written once, when all its queries are done."""

    def __init__(self, model: str, engine: dict, acfg: AnnotateConfig, parts: str, run: str, **kwargs: Any):
        from utilrag.annotate.engine import AsyncVLLMEngine

        kwargs["engine_factory"] = kwargs.get("engine_factory") or AsyncVLLMEngine
        super().__init__(model, engine, acfg, parts, run, **kwargs)
        self.blocks: asyncio.Semaphore | None = None  # made on Ray Data's event loop, at the first call

    async def _generate_one(self, request: Request) -> dict[str, Any]:
        engine: Any = self.engine  # an AsyncVLLMEngine (or a stand-in with generate_one)
        return await engine.generate_one(request.messages, self.sampling[request.stage])

    async def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:  # type: ignore[override]
        # Ray Data may hand this actor more batches at once than blocks_per_replica (its async batch
        # concurrency, fixed when the driver plans the job, times max_concurrent_calls_per_actor): the
        # others wait here, before their block starts.
        if self.blocks is None:
            self.blocks = asyncio.Semaphore(self.acfg.scale.blocks_per_replica)
        async with self.blocks:
            # object-storage round trips off the event loop: it feeds the engine every block in flight
            call, block = await asyncio.to_thread(self._begin, batch)
            if not call:
                return self._stats(batch.num_rows, 0, 0)
            if self.fail.get("block_delay_s"):
                await asyncio.to_thread(self._delay)
            if not await asyncio.to_thread(self._isolate, block):
                try:
                    after_wave = self._after_wave(call)
                    table = await run_block_async(
                        batch, self._generate_one, self.acfg, self.graded_ids, self.run, after_wave
                    )
                    return await asyncio.to_thread(self._write, table)
                except RequestsFailed as e:
                    self._on_failure(e, block)
            tables = []
            for i in range(batch.num_rows):  # alone, one after another (the other blocks go on meanwhile)
                one = batch.slice(i, 1)
                tables.append(await self._one_query_async(one))
            return await asyncio.to_thread(self._write, pa.concat_tables(tables))

    async def _one_query_async(self, one: pa.Table) -> pa.Table:
        """ChainAnnotator._one_query on the engine's event loop."""
        attempts = QueryTries(self, one)
        for _ in attempts:
            try:
                return await run_block_async(one, self._generate_one, self.acfg, self.graded_ids, self.run)
            except RequestsFailed as e:
                attempts.failed(e)
        return attempts.error_row()
