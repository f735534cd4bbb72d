"""One writer per stage folder (utilrag.lease), in-process, locally and on the S3-compatible server.

What the CLI does with it (a second job exits 2 with one line, a SIGKILLed holder is taken over by the
rerun) is in test_kill_matrix.py (local) and test_object_storage.py (S3). Here: the lease's rules and
the commit's fence, which cannot be shown by two processes racing without a pause hook.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from utilrag import lease, store

pytestmark = pytest.mark.usefixtures("no_leases_left")


@pytest.fixture
def no_leases_left():
    yield
    lease.release_all()


@pytest.fixture
def other_process():
    """A live process that is not this one: the holder of a lease written by 'another job'."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def foreign_lease(folder: str, *, pid: int, host: str | None = None, age_s: float = 0.0) -> dict:
    """The lease record another job would have written: its own token, pid, host and heartbeat."""
    import psutil

    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        started = None
    now = time.time() - age_s
    record = {
        **lease._record("pools", uuid.uuid4().hex),  # this machine's, unless ``host`` names another
        "pid": pid,
        "pid_started": started,
        "acquired_at": now,
        "heartbeat_at": now,
        "timeout_s": 300,
        **({"host": host} if host else {}),
    }
    store.write_text(store.join(folder, lease.LEASE), json.dumps(record))
    return record


def write_output(writer: store.StageWriter, text: str) -> None:
    store.write_text(writer.path("out.txt"), text)


def committed_text(folder: str) -> str | None:
    done = store.reusable(folder, "fp")
    return store.read_text(done.path("out.txt")) if done else None


# --------------------------------------------------------------------------- local
def test_a_live_holder_refuses_a_second_writer_with_one_line(tmp_path, other_process):
    folder = str(tmp_path / "pools")
    first = store.begin(folder, "pools", "fp")
    write_output(first, "clean")
    first.commit()
    record = foreign_lease(folder, pid=other_process.pid)
    manifest_before = (tmp_path / "pools" / "manifest.json").read_text()
    with pytest.raises(lease.LeaseHeld) as refused:
        store.begin(folder, "pools", "fp")
    message = str(refused.value)
    assert "\n" not in message and f"pid {other_process.pid} on {socket.gethostname()}" in message, message
    # Nothing touched: the committed outputs, their manifest and the other job's lease.
    assert (tmp_path / "pools" / "manifest.json").read_text() == manifest_before
    assert committed_text(folder) == "clean"
    assert json.loads((tmp_path / "pools" / lease.LEASE).read_text())["token"] == record["token"]


def test_a_dead_holder_is_taken_over_at_once_and_an_expired_one_after_its_timeout(tmp_path, capsys):
    folder = str(tmp_path / "pools")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    foreign_lease(folder, pid=gone.pid)  # the SIGKILLed holder: same host, its pid gone
    t0 = time.time()
    writer = store.begin(folder, "pools", "fp")
    assert time.time() - t0 < 5
    said = capsys.readouterr().out  # the utilrag logger writes [stage] lines to stdout
    assert "took over the lease" in said and "is gone" in said
    write_output(writer, "mine")
    writer.commit()
    assert committed_text(folder) == "mine"
    assert not (tmp_path / "pools" / lease.LEASE).exists()  # released by the commit

    # Another host: not provably dead; held while its heartbeat is fresh, taken over once it is stale.
    foreign_lease(folder, pid=1, host="elsewhere", age_s=10)
    with pytest.raises(lease.LeaseHeld, match="on elsewhere"):
        store.begin(folder, "pools", "fp")
    foreign_lease(folder, pid=1, host="elsewhere", age_s=301)
    store.begin(folder, "pools", "fp").commit()
    assert "heartbeat is 301s old (timeout 300s)" in capsys.readouterr().out


def test_a_lease_cut_short_by_a_crash_is_nobodys(tmp_path):
    folder = tmp_path / "pools"
    folder.mkdir()
    (folder / lease.LEASE).write_text('{"token": "ab')
    store.begin(str(folder), "pools", "fp").commit()


def test_the_commit_is_fenced_after_a_takeover(tmp_path):
    """Job A begins; job B takes the folder over (here: A's lease forgotten by this process, so B's
    begin finds it held by this same pid and takes it as a dead run's); A's commit must then fail and
    leave B's outputs alone; B commits."""
    folder = str(tmp_path / "pools")
    a = store.begin(folder, "pools", "fp")
    write_output(a, "from A")
    lease._held.pop(store.normalize(folder))
    b = store.begin(folder, "pools", "fp")
    write_output(b, "from B")
    with pytest.raises(lease.LeaseLost, match="taken over"):
        a.commit()
    assert not Path(a.staging).exists()  # B's begin cleared A's staging: A cannot write into B's
    assert Path(b.path("out.txt")).read_text() == "from B"  # and A moved nothing
    b.commit()
    assert committed_text(folder) == "from B"


def test_the_heartbeat_notices_a_lost_lease(tmp_path, other_process):
    folder = str(tmp_path / "pools")
    writer = store.begin(folder, "pools", "fp")
    before = json.loads((tmp_path / "pools" / lease.LEASE).read_text())["heartbeat_at"]
    time.sleep(0.05)
    writer.held.heartbeat()
    assert json.loads((tmp_path / "pools" / lease.LEASE).read_text())["heartbeat_at"] > before
    foreign_lease(folder, pid=other_process.pid)  # a job that took it over
    writer.held.heartbeat()
    assert writer.held.lost and "taken over" in writer.held.lost
    with pytest.raises(lease.LeaseLost):
        writer.commit()


# --------------------------------------------------------------------------- S3 (moto_server)
def s3_versions(folder: str) -> list[str]:
    fs, path = store.filesystem(folder)
    return sorted(
        Path(i.path).name
        for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if Path(i.path).name.startswith("v-")
    )


@pytest.mark.slow
def test_s3_conditional_lease_and_fenced_commit(s3_env, other_process):
    from conftest import S3_BUCKET

    folder = f"s3://{S3_BUCKET}/lease-{uuid.uuid4().hex[:8]}/pools"
    first = store.begin(folder, "pools", "fp")
    write_output(first, "clean")
    first.commit()
    assert not store.exists(store.join(folder, lease.LEASE))  # released

    # A live holder: a second writer is refused (If-None-Match: * failed, the holder is alive).
    foreign_lease(folder, pid=other_process.pid)
    with pytest.raises(lease.LeaseHeld, match=f"pid {other_process.pid}"):
        store.begin(folder, "pools", "fp")
    # Its process gone: taken over at once (If-Match on the lease's ETag).
    other_process.kill()
    other_process.wait(timeout=10)
    a = store.begin(folder, "pools", "fp")
    write_output(a, "from A")

    # B takes A's folder over mid-write; A's commit must fail and must not delete B's version.
    lease._held.pop(folder)
    b = store.begin(folder, "pools", "fp")
    write_output(b, "from B")
    with pytest.raises(lease.LeaseLost, match="taken over"):
        a.commit()  # the check inside the fence sees B's lease
    # The race that check alone would lose: B's takeover landing between A's check and A's writes.
    # The manifest write itself is conditional (If-Match on A's running marker), so A still fails.
    a.held.check = lambda: None  # type: ignore[method-assign]
    with pytest.raises(lease.LeaseLost, match="rewritten by another job"):
        a.commit()
    assert b.prefix in s3_versions(folder)
    b.commit()
    assert committed_text(folder) == "from B"
    assert s3_versions(folder) == [b.prefix]  # B's commit removed the older versions, A's included
