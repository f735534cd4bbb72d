"""The engine processes' reaper, run by path as a script (``python reaper.py <replica pid> [pid ...]``,
no package import: it starts in a fraction of a second and holds a few MiB). The listed pids are
children the replica had before its engine started: they and everything under them are left alone.

vLLM runs its EngineCore (and its tensor-parallel workers) in processes of their own, which do not
notice their replica dying: a SIGKILLed replica (OOM killer, a lost Ray worker) leaves them holding the
GPU, and the replica Ray restarts then fails vLLM's free-memory check. This process remembers every
process under the replica while it lives and SIGKILLs them all once it is gone, then exits.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 0.5


def engine_processes(replica: psutil.Process, exclude: set[int]) -> list[psutil.Process]:
    """The processes under ``replica`` but not under its children in ``exclude``. A child that ends
    while it is listed is skipped (NoSuchProcess here is never the replica's own end)."""
    found = []
    for child in replica.children():
        if child.pid in exclude:
            continue
        try:
            found += [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def reap(replica_pid: int, exclude: set[int], poll_s: float = POLL_S) -> int:
    """Watch ``replica_pid``; when it is gone, kill what ran under it (``exclude``: see above). Returns
    the number killed."""
    try:
        replica = psutil.Process(replica_pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, psutil.Process] = {}
    me = os.getpid()
    while _alive(replica):
        try:
            for process in engine_processes(replica, exclude | {me}):
                known.setdefault(process.pid, process)
        except psutil.NoSuchProcess:  # the replica ended while its children were listed: checked above
            pass
        time.sleep(poll_s)
    killed = 0
    for process in known.values():
        try:
            process.kill()  # psutil checks the creation time first: a reused pid is not touched
            killed += 1
        except psutil.NoSuchProcess:
            pass
    return killed


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    reap(int(sys.argv[1]), {int(pid) for pid in sys.argv[2:]})
