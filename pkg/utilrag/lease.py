"""One writer per stage folder: a lease taken before a stage's first write to the folder it owns.

Two jobs on one ``output_dir`` (a resubmit after Ctrl-C on ``ray job submit``, which stops the log
tail and not the job) would otherwise overwrite each other's running marker, staging and versions.

The lease is ``<folder>/.lease.json``: the holder's token, job, host, pid and a heartbeat.
- Taken with a conditional create: ``O_EXCL`` locally, ``If-None-Match: *`` on S3. A second job finds
  it held and stops with one line naming the holder (exit 2).
- A holder that is provably dead (same host, its pid gone or reused) is taken over at once, so a rerun
  after a kill never waits; a holder elsewhere whose heartbeat is older than the timeout is taken over
  too, and the log says so. A takeover is itself conditional (under the folder's lock locally,
  ``If-Match`` on the lease's ETag on S3): of two jobs taking over, one wins.
- Fencing: the commit acts only while the lease is still this job's, and not as a check followed by
  an act. Locally the lease and the commit are changed under one ``flock`` of ``<folder>/.lease.lock``.
  On S3 every manifest write after the running marker is ``If-Match`` on the marker this job wrote
  (a job that took the folder over has written its own), and a commit deletes only the version
  prefixes that existed when this job began, never one made after.
- gs://: no conditional-write client is installed here and there is no emulator to test one, so on
  GCS the lease is written and checked without a condition (a warning says so once).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utilrag.errors import UtilragError
from utilrag.logs import get_logger

log = get_logger("lease")
LEASE = ".lease.json"
LOCK = ".lease.lock"
# The holder rewrites its heartbeat this often; another job takes the lease over once the heartbeat is
# older than the timeout (a holder that is provably dead is taken over at once).
HEARTBEAT_S = float(os.environ.get("UTILRAG_LEASE_HEARTBEAT_S", "30"))
TIMEOUT_S = float(os.environ.get("UTILRAG_LEASE_TIMEOUT_S", "300"))


class LeaseHeld(UtilragError):
    """Another live job holds the folder's lease."""


class LeaseLost(UtilragError):
    """This job's lease was taken over (its heartbeat lapsed): it must not commit."""


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _submission_id() -> str | None:
    """The Ray job submission id of this driver (what `ray job stop` takes), if `ray job submit` started it:
    Ray passes the job's metadata to its driver in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))["metadata"]["job_submission_id"]
    except (ValueError, KeyError, TypeError):
        return None


def _machine() -> dict[str, Any]:
    """What makes a pid comparable: the same boot of the same machine and the same pid namespace
    (containers on host networking share a hostname, not their pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, pid_ns = None, None
    return {"host": socket.gethostname(), "boot_id": boot, "pid_ns": pid_ns}


def _record(stage: str, token: str) -> dict[str, Any]:
    now = time.time()
    return {
        "token": token,
        "stage": stage,
        **_machine(),
        "pid": os.getpid(),
        "pid_started": _process_started(os.getpid()),
        "ray_job": _submission_id(),
        "acquired_at": now,
        "heartbeat_at": now,
        "timeout_s": TIMEOUT_S,
    }


def holder_state(record: dict[str, Any]) -> tuple[str, str]:
    """('dead' | 'expired' | 'alive', why) for a lease record found in a folder."""
    age = time.time() - float(record.get("heartbeat_at", 0))
    here = _machine()
    if all(record.get(k) == here[k] for k in ("host", "boot_id", "pid_ns")):  # its pid is one of ours
        started = _process_started(int(record.get("pid", -1)))
        if started is None:
            return "dead", f"its process {record.get('pid')} on this host is gone"
        if record.get("pid_started") is not None and abs(started - float(record["pid_started"])) > 1:
            return "dead", f"its pid {record.get('pid')} now belongs to another process"
        if record.get("pid") == os.getpid():
            return "dead", "this process took it for a run that ended without releasing it"
    timeout = float(record.get("timeout_s", TIMEOUT_S))
    if age > timeout:
        return "expired", f"its heartbeat is {age:.0f}s old (timeout {timeout:.0f}s)"
    return "alive", f"heartbeat {age:.0f}s ago"


def describe(record: dict[str, Any]) -> str:
    job = f"Ray job {record['ray_job']}, " if record.get("ray_job") else ""
    return f"{record.get('stage')} ({job}pid {record.get('pid')} on {record.get('host')})"


# --------------------------------------------------------------------------- backends
class _Local:
    """A local (or shared POSIX) folder: O_EXCL create; takeover, refresh, release and commit under flock."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LEASE)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import fcntl

        os.makedirs(self.folder, exist_ok=True)  # the stage's own folder: begin creates it anyway
        fd = os.open(os.path.join(self.folder, LOCK), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def read(self) -> tuple[dict | None, str | None]:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(text), text
        except json.JSONDecodeError:  # a lease cut short by a crash mid-write: nobody's
            return {"token": None, "heartbeat_at": 0, "timeout_s": 0}, text

    def create(self, record: dict) -> str | None:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
        return None

    def replace(self, record: dict, version: str | None) -> str | None:
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record))
        os.replace(tmp, self.path)
        return None

    def delete(self, version: str | None) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _S3:
    """An S3 (or S3-compatible) folder: If-None-Match: * to create, If-Match on the ETag to change."""

    def __init__(self, folder: str):
        try:
            import boto3
        except ImportError:
            raise UtilragError(
                f"{folder}: the folder lease on s3:// needs boto3 (in requirements/*.lock): pip install boto3"
            ) from None

        bucket, _, key = folder.partition("://")[2].partition("/")
        self.bucket, self.key = bucket, posixpath.join(key, LEASE) if key else LEASE
        self.client = boto3.client("s3")  # endpoint and credentials from the environment, as pyarrow's

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        yield  # every change below is conditional on the object's state instead

    @staticmethod
    def code(e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def precondition_failed(self, e: Exception) -> bool:
        return self.code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    @contextlib.contextmanager
    def answers(self) -> Iterator[None]:
        """boto3's errors (no bucket, no credentials, no endpoint) as one line, as pyarrow's are."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as e:
            raise UtilragError(f"s3://{self.bucket}/{self.key}: object storage: {e}") from None

    def read(self) -> tuple[dict | None, str | None]:
        from botocore.exceptions import ClientError

        with self.answers():
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if self.code(e) in ("NoSuchKey", "404"):
                    return None, None
                raise
            return json.loads(answer["Body"].read()), answer["ETag"]

    def create(self, record: dict) -> str | None:
        from botocore.exceptions import ClientError

        with self.answers():
            try:
                body = json.dumps(record)
                return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")["ETag"]
            except ClientError as e:
                if self.precondition_failed(e):
                    raise FileExistsError(self.key) from None
                raise

    def replace(self, record: dict, version: str | None) -> str | None:
        from botocore.exceptions import ClientError

        with self.answers():
            try:
                body = json.dumps(record)
                return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=version)["ETag"]
            except ClientError as e:  # another job's version, or none at all (released meanwhile)
                if self.precondition_failed(e) or self.code(e) in ("NoSuchKey", "404"):
                    raise LeaseLost(f"s3://{self.bucket}/{self.key} changed under us") from None
                raise

    def delete(self, version: str | None) -> None:
        from botocore.exceptions import ClientError

        with self.answers():
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
            except ClientError as e:
                if not (self.precondition_failed(e) or self.code(e) in ("NoSuchKey", "404")):
                    raise

    # The fence of a commit on S3: manifest writes conditional on the manifest this job last wrote.
    def put_conditional(self, location: str, body: bytes, etag: str | None) -> str:
        from botocore.exceptions import ClientError

        bucket, _, key = location.partition("://")[2].partition("/")
        kwargs = {"IfMatch": etag} if etag else {}
        with self.answers():
            try:
                return self.client.put_object(Bucket=bucket, Key=key, Body=body, **kwargs)["ETag"]
            except ClientError as e:
                if self.precondition_failed(e):
                    raise LeaseLost(
                        f"{location} was rewritten by another job: this job's lease was taken over; not committing"
                    ) from None
                raise


_warned_unconditional = False


def _backend(folder: str):
    global _warned_unconditional
    if folder.startswith("s3://"):
        return _S3(folder)
    if "://" in folder:
        if not _warned_unconditional:
            log.warning(f"{folder}: no conditional writes on this store here; the lease is written unconditionally")
            _warned_unconditional = True
        return _Unconditional(folder)
    return _Local(folder)


class _Unconditional(_Local):
    """gs:// and other stores through pyarrow: the same record, written without a condition."""

    def __init__(self, folder: str):
        from utilrag import store

        self.folder, self.location = folder, store.join(folder, LEASE)
        self._store = store

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        yield

    def read(self) -> tuple[dict | None, str | None]:
        text = self._store.read_text(self.location)
        return (json.loads(text), text) if text is not None else (None, None)

    def create(self, record: dict) -> str | None:
        if self._store.exists(self.location):
            raise FileExistsError(self.location)
        self._store.write_text(self.location, json.dumps(record))
        return None

    def replace(self, record: dict, version: str | None) -> str | None:
        self._store.write_text(self.location, json.dumps(record))
        return None

    def delete(self, version: str | None) -> None:
        self._store.remove(self.location)


# --------------------------------------------------------------------------- the lease
@dataclass
class Lease:
    folder: str
    stage: str
    token: str
    record: dict
    backend: Any
    version: str | None = None  # S3: the lease object's ETag
    manifest_etag: str | None = None  # S3: the manifest this job last wrote (the commit's fence)
    lost: str | None = None
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still this job's (call it under ``fenced``)."""
        record, _ = self.backend.read()
        if self.lost or record is None or record.get("token") != self.token:
            holder = describe(record) if record else "nobody"
            raise LeaseLost(
                f"{self.folder}: this job's lease on the folder was taken over (now held by {holder}); not "
                f"committing. {self.lost or ''}".strip()
            )

    @contextlib.contextmanager
    def fenced(self) -> Iterator[None]:
        """The commit's critical section: locally the folder's flock with the lease checked inside it, so
        no takeover can land between the check and the writes; on S3 the writes themselves are
        conditional (see put_manifest)."""
        with self.lock, self.backend.locked():
            self.check()
            yield

    def heartbeat(self) -> None:
        with self.lock, self.backend.locked():
            if self.lost or self.released:
                return
            record, version = self.backend.read()
            if record is None or record.get("token") != self.token:
                self.lost = f"taken over by {describe(record) if record else 'nobody (removed)'}"
                log.warning(f"{self.folder}: lease lost: {self.lost}")
                return
            self.record = {**self.record, "heartbeat_at": time.time()}
            try:
                self.version = self.backend.replace(self.record, self.version)
            except LeaseLost as e:
                self.lost = str(e)
                log.warning(f"{self.folder}: lease lost: {self.lost}")

    def release(self) -> None:
        _held.pop(self.folder, None)
        with self.lock, self.backend.locked():
            if self.released:
                return
            self.released = True
            record, _ = self.backend.read()
            if record is not None and record.get("token") == self.token:
                self.backend.delete(self.version)


_held: dict[str, Lease] = {}
_heart: threading.Thread | None = None


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        for lease in list(_held.values()):
            try:
                lease.heartbeat()
            except Exception as e:  # noqa: BLE001 - a failed heartbeat is retried; the commit is fenced anyway
                log.warning(f"{lease.folder}: lease heartbeat failed ({type(e).__name__}: {e})")


def held(folder: str) -> Lease | None:
    """This process's lease on the folder, if it holds one."""
    return _held.get(folder)


def acquire(folder: str, stage: str) -> Lease:
    """Take the folder's lease (or return the one this process already holds); LeaseHeld if a live job has it."""
    global _heart
    if folder in _held:
        return _held[folder]
    backend = _backend(folder)
    token = uuid.uuid4().hex
    record = _record(stage, token)
    with backend.locked():
        version = None
        for _ in range(3):  # a takeover that loses its race reads the winner and decides again
            try:
                version = backend.create(record)
                break
            except FileExistsError:
                pass
            found, found_version = backend.read()
            if found is None:
                continue  # released between our create and our read
            state, why = holder_state(found)
            if state == "alive":
                raise LeaseHeld(
                    f"{folder} is being written by {describe(found)}, {why}; wait for it, or stop that job "
                    "(`ray job stop <id>`, or kill the process) and run again"
                )
            try:
                version = backend.replace(record, found_version)
            except LeaseLost:
                continue
            say = log.info if state == "dead" else log.warning
            say(f"{folder}: took over the lease of {describe(found)}: {why}")
            break
        else:
            raise LeaseHeld(f"{folder}: could not take the folder's lease: other jobs keep taking it")
    lease = Lease(folder, stage, token, record, backend, version)
    _held[folder] = lease
    if _heart is None or not _heart.is_alive():
        _heart = threading.Thread(target=_beat, name="utilrag-lease-heartbeat", daemon=True)
        _heart.start()
    return lease


@contextlib.contextmanager
def holding(folder: str, stage: str) -> Iterator[Lease]:
    """The lease for a block of work on the folder; released at the end, whatever happens."""
    already = folder in _held
    lease = acquire(folder, stage)
    try:
        yield lease
    finally:
        if not already:
            lease.release()


def release_all() -> None:
    """Release every lease this process holds (the end of a stage, whatever its outcome)."""
    for held_lease in list(_held.values()):
        try:
            held_lease.release()
        except Exception as e:  # noqa: BLE001 - a rerun takes a dead holder's lease over anyway
            log.warning(f"{held_lease.folder}: could not release the lease ({type(e).__name__}: {e})")
