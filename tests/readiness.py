"""Readiness waits for what the tests start (the S3-compatible server, Ray heads and nodes, the job API).

On two busy cores a server may accept a connection and answer its first request seconds later. So a
wait here treats every failed try (refused, reset, read timeout, an error answer, a check that does not
hold yet) as "not yet", gives each try a timeout that doubles up to what is left of the deadline, stops
early only when the process it waits on has exited, and fails with one message that carries the
process's log.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

FIRST_TRY_S = 1.0  # the old fixed timeout: the first try still answers fast on an idle machine
LONGEST_TRY_S = 30.0


class NotReady(RuntimeError):
    """A readiness wait passed its deadline (or its process exited first)."""


def log_tail(logs: Iterable[Path | str], chars: int = 3000) -> str:
    """The ends of the given log files (missing ones named as such), for a failure message."""
    parts = []
    for log in logs:
        path = Path(log)
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            text = f"<unreadable: {e}>"
        parts.append(f"--- {path} (last {chars} chars) ---\n{text[-chars:]}")
    return "\n".join(parts) or "<no log>"


def wait_until(
    what: str,
    probe: Callable[[float], T | None],
    *,
    deadline_s: float,
    logs: Iterable[Path | str] = (),
    process: subprocess.Popen | None = None,
    pause_s: float = 0.2,
    fatal: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``probe(timeout_s)`` until it returns something other than None; return that.

    Any exception from the probe counts as "not ready yet", except those of the ``fatal`` types,
    which propagate at once. ``timeout_s`` starts at FIRST_TRY_S and
    doubles after each try whose exception was a timeout, up to LONGEST_TRY_S and never past the
    deadline. Raises NotReady with the last error and the logs' tails once ``deadline_s`` has passed,
    or at once if ``process`` has exited.
    """
    start = time.monotonic()
    deadline = start + deadline_s
    timeout, tries, last = FIRST_TRY_S, 0, "no try made"
    while True:
        if process is not None and process.poll() is not None:
            raise NotReady(
                f"{what}: its process exited with {process.returncode} after {time.monotonic() - start:.1f}s "
                f"(last try: {last})\n{log_tail(logs)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NotReady(
                f"{what}: not ready after {deadline_s:.0f}s and {tries} tries (last try: {last})\n{log_tail(logs)}"
            )
        tries += 1
        try:
            result = probe(max(0.1, min(timeout, remaining)))
        except fatal:
            raise
        except Exception as e:  # noqa: BLE001 - every failure of a first contact means "not yet"
            last = f"{type(e).__name__}: {str(e)[:300]}"
            if "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower():
                timeout = min(timeout * 2, LONGEST_TRY_S)
        else:
            if result is not None:
                return result
            last = "the check does not hold yet"
        time.sleep(min(pause_s, max(0.0, deadline - time.monotonic())))


def wait_http(
    url: str,
    what: str,
    *,
    deadline_s: float = 120,
    logs: Iterable[Path | str] = (),
    process: subprocess.Popen | None = None,
) -> None:
    """Until ``url`` answers a GET with any status below 500 (a 404 from a server is a server up)."""
    import requests

    def probe(timeout: float) -> bool | None:
        status = requests.get(url, timeout=timeout).status_code
        if status >= 500:
            raise RuntimeError(f"HTTP {status}")
        return True

    wait_until(what, probe, deadline_s=deadline_s, logs=logs, process=process)
