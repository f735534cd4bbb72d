"""The rehearsal's STAND-IN engine (benchmarks/rehearsal.py; a stand-in, not an LLM: it measures our
plumbing under a GPU cluster's failures, never label quality). It lives here, never in the package.

As vLLM's AsyncLLM does, the replica-side object starts an engine-core child process and talks to it
over pipes; the core does not notice its parent's death (vLLM's EngineCore does not either: the
replica's reaper must kill it). Time is compressed by F:

- start: the core sleeps ``load_s`` (a 32B model's load, / F) before it says ready;
- each request's engine work is the cost model's (utilrag.cost) at the A100-80G's rates:
  prompt tokens / (prefill x vLLM efficiency) + output tokens / decode, / F; the core runs at most
  ``max_num_seqs`` requests at once and shares its time among them (processor sharing), so a
  request's latency grows with the work in flight and the engine's throughput stays the GPU's;
- tokens are counted as characters / 4; the output is a fixed valid answer per stage.

Faults, each injected once per job through marker files or the rehearsal's signals:
- the first engine to start anywhere fails its start (``check()`` raises, as vLLM's start error);
- a request whose prompt holds ``poison`` raises at once (every try: an error row);
- a core SIGKILLed by the rehearsal: every request in flight, and every later one, raises
  ``EngineDeadError`` (named as vLLM's, which the chain recognises by name).

Every request of a query's first stage is logged (time, replica pid, query id) for the rehearsal's
redone-work count, and each core writes its time-weighted running count for ``engine_fill``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CORE_MARKER = "utilrag-rehearsal-core"
# The core: stdin "id seconds" lines in, stdout "id" lines out when done; it ignores stdin closing (an
# orphan keeps running, as vLLM's EngineCore would, until something kills it).
CORE = r"""
import json, os, sys, threading, time
load_s, max_seqs, stats = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
time.sleep(load_s)
print("ready", flush=True)
lock = threading.Lock()
waiting, running = [], {}
def read():
    for line in sys.stdin:
        rid, seconds = line.split()
        with lock:
            if seconds == "abort":  # a cancelled request (vLLM's AsyncLLM aborts them too)
                running.pop(rid, None)
                waiting[:] = [w for w in waiting if w[0] != rid]
            else:
                waiting.append((rid, float(seconds)))
threading.Thread(target=read, daemon=True).start()
area = alive = 0.0
last = written = time.time()
while True:
    time.sleep(0.002)
    now = time.time()
    step, last = now - last, now
    with lock:
        while waiting and len(running) < max_seqs:
            rid, seconds = waiting.pop(0)
            running[rid] = seconds
        n = len(running)
        done = []
        for rid in running:
            running[rid] -= step / n
            if running[rid] <= 0:
                done.append(rid)
        for rid in done:
            del running[rid]
    area += n * step
    alive += step
    if done:
        sys.stdout.write("".join(r + "\n" for r in done))
        sys.stdout.flush()
    if now - written > 0.5:
        written = now
        with open(stats + ".tmp", "w") as f:  # whole or not at all: a core may be SIGKILLed any time
            json.dump({"area": area, "alive": alive, "max_num_seqs": max_seqs}, f)
        os.replace(stats + ".tmp", stats)
"""

OUTPUTS = {
    "You are the relevance judger": "My selection:[[1],[3],[5]].",
    "You are a faithful question": "A stand-in answer.",
    "You are the utility judger": "My selection:[[1]].",
    "You are RankGPT": "[2] > [1] > [3]",
}
QUERY_ID = re.compile(r"\b(q\d+)\b")


class EngineDeadError(RuntimeError):
    """The stand-in core is gone (named as vLLM's: the chain matches the name)."""


def first_time(marker: Path) -> bool:
    try:
        marker.touch(exist_ok=False)
        return True
    except FileExistsError:
        return False


class StandInEngine:
    """The replica's engine (sync ``generate`` and async ``generate_one``), a STAND-IN. ``settings`` is
    set by the rehearsal's driver before the job; the class goes to the replicas pickled by value."""

    settings: dict[str, Any] = {}

    def __init__(self, model: str, engine: dict):
        s = self.settings
        self.folder = Path(s["folder"])
        self.error: str | None = None
        self.starts, self.busy_s, self.dead = 0, 0.0, False
        self.in_flight, self._busy_since = 0, 0.0
        self.max_num_seqs = int(engine.get("max_num_seqs") or 64)
        self.pending: dict[str, tuple[Any, list]] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.core: subprocess.Popen | None = None
        if first_time(self.folder / "start-failed"):
            self.error = "a stand-in engine that fails its first start (injected)"
            self.ready_at = time.time()
            return
        stats = self.folder / f"fill-{os.getpid()}-{time.time_ns()}.json"
        self.core = subprocess.Popen(
            [sys.executable, "-c", CORE, str(s["load_s"]), str(self.max_num_seqs), str(stats), CORE_MARKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.core.stdout is not None
        if self.core.stdout.readline().strip() != "ready":
            self.error = "the stand-in core did not start"
        self.starts = 1
        self.ready_at = time.time()
        self.log = open(self.folder / f"requests-{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115
        threading.Thread(target=self._read, daemon=True).start()

    # ------------------------------------------------------------------ the engine interface
    def sampling_params(self, sampling: dict) -> dict:
        return sampling

    def check(self) -> None:
        if self.error:
            raise RuntimeError(f"the vLLM engine did not start: {self.error}")

    def generate(self, messages: list, sampling: list) -> dict:
        t0 = time.time()
        waits = []
        for chat in messages:
            event = threading.Event()
            waits.append((event, self._submit(chat, event.set)[1:]))
        outs = []
        for event, (box, out) in waits:
            event.wait()
            outs.append(self._result(box, out))
        self.busy_s += time.time() - t0
        return {k: [o[k] for o in outs] for k in outs[0]} if outs else {}

    async def generate_one(self, chat: list, sampling: Any) -> dict:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def wake() -> None:  # on the reader thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        rid, box, out = self._submit(chat, wake)
        self._enter()
        try:
            await done
        except asyncio.CancelledError:  # the block failed elsewhere: its other requests are aborted
            self._abort(rid)
            raise
        finally:
            self._leave()
        return self._result(box, out)

    def _enter(self) -> None:
        if self.in_flight == 0:
            self._busy_since = time.time()
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.busy_s += time.time() - self._busy_since

    def busy(self) -> float:
        """Seconds with a request in flight (as AsyncVLLMEngine counts them)."""
        return self.busy_s + (time.time() - self._busy_since if self.in_flight else 0.0)

    def _abort(self, rid: str) -> None:
        with self.lock:
            self.pending.pop(rid, None)
        try:
            assert self.core is not None and self.core.stdin is not None
            self.core.stdin.write(f"{rid} abort\n")
            self.core.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    # ------------------------------------------------------------------ the core
    def _submit(self, chat: list, wake) -> tuple[str, list, dict]:
        """Send one request to the core; ``wake()`` is called (on the reader thread) when it ends."""
        text = json.dumps(chat)
        if self.settings["poison"] in text:
            raise ValueError("a poisoned request (injected)")
        first = chat[0]["content"]
        raw = next((v for k, v in OUTPUTS.items() if first.startswith(k)), "##final score: 2")
        out = {
            "raw_output": raw,
            "prompt_tokens": sum(len(m["content"]) for m in chat) // 4,
            "output_tokens": max(1, len(raw) // 4),
            "cached_tokens": 0,
            "finish_reason": "stop",
        }
        if first.startswith("You are the relevance judger"):
            found = QUERY_ID.search(chat[-1]["content"]) or QUERY_ID.search(text)
            self.log.write(f"{time.time():.3f} {os.getpid()} {found.group(1) if found else '?'}\n")
        s = self.settings
        seconds = (
            out["prompt_tokens"] / (s["prefill_tokens_per_s"] * s["vllm_efficiency"])
            + out["output_tokens"] / s["decode_tokens_per_s"]
        ) / s["F"]
        rid = str(next(self.ids))
        box: list = []
        with self.lock:
            if self.dead:
                raise EngineDeadError("the stand-in engine core is gone")
            self.pending[rid] = (wake, box)
        try:
            assert self.core is not None and self.core.stdin is not None
            self.core.stdin.write(f"{rid} {seconds:.6f}\n")
            self.core.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()
        return rid, box, out

    @staticmethod
    def _result(box: list, out: dict) -> dict:
        if box and box[0] == "dead":
            raise EngineDeadError("the stand-in engine core is gone")
        return out

    def _read(self) -> None:
        assert self.core is not None and self.core.stdout is not None
        try:
            for line in self.core.stdout:
                with self.lock:
                    entry = self.pending.pop(line.strip(), None)
                if entry:
                    try:
                        entry[0]()
                    except RuntimeError:  # its event loop is closed: nobody waits for it
                        pass
        finally:
            self._died()  # the core is gone (or this thread failed): every waiter hears of it

    def _died(self) -> None:
        with self.lock:
            self.dead = True
            pending, self.pending = list(self.pending.values()), {}
        for wake, box in pending:
            box.append("dead")
            try:
                wake()
            except RuntimeError:
                pass
