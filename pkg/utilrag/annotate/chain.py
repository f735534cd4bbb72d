"""Job B's replica: one engine runs every stage of a block of queries, and writes the block atomically.

A block (``scale.batch_size`` queries) goes through three generate waves on the same engine, each
wave one ``generate`` call mixing stages (per-request sampling):

1. RelSel windows (and the graded judge's prompts, which need nothing earlier);
2. the pseudo-answer of each query RelSel chose something for;
3. UtilSel and UtilRank windows over the RelSel choice, with the answer.

The block's result, one CHAIN_SCHEMA row per query with every stage's rows, is written as one Parquet
part named by the block's query ids (a retried block overwrites its own part), so a block's rows land
all at once or not at all. The stage tables and labels are cut out of these parts afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from utilrag.annotate import prompts
from utilrag.annotate.prompts import PROMPT_VERSION
from utilrag.annotate.stages import STAGE_ORDER, STAGE_SCHEMA, parse_output, windows
from utilrag.config import AnnotateConfig

STAGE_ROW = pa.struct([f for f in STAGE_SCHEMA if f.name != "query_id"])
CHAIN_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("part", pa.int32()),  # the input file the query came from (resume skips finished files)
        ("run", pa.string()),  # the run that wrote it (new vs resumed rows)
        ("skipped", pa.string()),  # why answer / UtilSel / UtilRank were not asked; null: they were
        ("all_pool", pa.list_(pa.string())),
        ("human", pa.list_(pa.string())),
        ("judged", pa.list_(pa.string())),
        ("judged_grades", pa.list_(pa.int32())),
        *[(stage, pa.list_(STAGE_ROW)) for stage in STAGE_ORDER],
    ]
)
STATS_SCHEMA = ["queries", "rows", "tokens", "pid", "ready_at", "busy_s", "alive_s", "engine_starts"]
WAVES = (("relsel", "graded"), ("answer",), ("utilsel", "utilrank"))


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

    max_tokens = acfg.sampling.answer_max_tokens if stage == "answer" else acfg.sampling.max_tokens
    return sampling_kwargs(acfg, max_tokens, stage_regex(stage))


def row_meta(stage: str, acfg: AnnotateConfig) -> dict:
    sampling = stage_sampling(stage, acfg)
    return {
        "model": acfg.model,
        "prompt_version": PROMPT_VERSION,
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

    def _request(self, i: int, stage: str, window: int, ids: list[str], build: Callable) -> Request:
        row = self.rows[i]
        text = dict(zip(row["doc_ids"], row["passages"]))
        cut = dict(zip(row["doc_ids"], row["cut"]))
        return Request(i, stage, window, ids, build([text[d] for d in ids]), sum(bool(cut[d]) for d in ids))

    def requests(self, wave: tuple[str, ...]) -> list[Request]:
        """The requests of one wave, given the earlier waves' results (stages not asked for: none)."""
        return [r for i in range(len(self.rows)) for r in self.query_requests(i, wave)]

    def query_requests(self, i: int, wave: tuple[str, ...]) -> list[Request]:
        """Query ``i``'s requests of one wave, given its earlier waves' results."""
        row = self.rows[i]
        return [
            r for s in wave if s in self.acfg.stages for r in self._stage_requests(i, s, row["query"], row["doc_ids"])
        ]

    def _stage_requests(self, i: int, stage: str, query: str, pool: list[str]) -> list[Request]:
        size = self.acfg.window
        if stage == "relsel":
            return [
                self._request(i, stage, w, ids, lambda p: prompts.relsel_messages(query, p))
                for w, ids in enumerate(windows(pool, size))
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
            values = {
                **{k: row[k] for k in ("query_id", "part", "all_pool", "human", "judged", "judged_grades")},
                "run": run,
                "skipped": self.skipped[i],
                **{stage: self.results[i].get(stage, []) for stage in STAGE_ORDER},
            }
            for name in CHAIN_SCHEMA.names:
                cols[name].append(values[name])
        return pa.table(cols, schema=CHAIN_SCHEMA)


def part_name(query_ids: list[str]) -> str:
    """The same block always gets the same name: a retry overwrites, never adds."""
    digest = hashlib.sha1("\n".join(sorted(query_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


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
    meta: dict[str, dict] = {stage: row_meta(stage, acfg) for stage in acfg.stages}
    for n, wave in enumerate(WAVES):
        requests = state.requests(wave)
        if requests:
            state.record(requests, generate(requests), meta)
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
    meta: dict[str, dict] = {stage: row_meta(stage, acfg) for stage in acfg.stages}

    async def one_query(i: int) -> None:
        for n, wave in enumerate(WAVES):
            requests = state.query_requests(i, wave)
            if requests:
                outputs = await all_or_none([generate_one(r) for r in requests])
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


class ChainAnnotator:
    """One replica (a Ray Data actor): the engine starts once, in ``__init__``; every call is one block.

    ``engine_factory(model, engine_kwargs)`` builds the engine (default: vLLM); the throughput
    benchmarks pass a stand-in. Returns one stats row per block (the driver only counts them)."""

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
        self.engine = (engine_factory or VLLMEngine)(model, engine)
        self.acfg, self.parts, self.run = acfg, parts, run
        self.graded_ids = set(graded_ids) if graded_ids is not None else None
        self.sampling: dict[str, Any] = {}
        if not self.engine.error:
            self.sampling = {s: self.engine.sampling_params(stage_sampling(s, acfg)) for s in acfg.stages}
        self.fail = fail or {}
        self.calls = 0

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
        call = self._begin(batch)
        if not call:
            return self._stats(0, 0, 0)
        time.sleep(self.fail.get("block_delay_s", 0))  # test-only (fault_injection); 0 otherwise
        table = run_block(batch, self._generate, self.acfg, self.graded_ids, self.run, self._after_wave(call))
        return self._write(table)

    def _begin(self, batch: pa.Table) -> int:
        """This block's number on this replica (1, 2, ...); 0: nothing to annotate (every query of the
        batch was finished before)."""
        from utilrag.annotate.engine import crash_once

        self.engine.check()
        if batch.num_rows == 0:
            return 0
        self.calls += 1
        if self.fail.get("after_batches") == self.calls:
            crash_once(self.fail["marker"])
        return self.calls

    def _write(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The block's part, written atomically under its queries' name; its counts for the driver."""
        from utilrag import store
        from utilrag.annotate.runner import write_atomic

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
            call = self._begin(batch)
            if not call:
                return self._stats(0, 0, 0)
            await asyncio.sleep(self.fail.get("block_delay_s", 0))  # test-only (fault_injection); 0 otherwise
            after_wave = self._after_wave(call)
            table = await run_block_async(batch, self._generate_one, self.acfg, self.graded_ids, self.run, after_wave)
            return await asyncio.to_thread(self._write, table)
