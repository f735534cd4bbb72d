"""One store: where every stage's outputs live, and the one commit protocol they are written by.

Locations are strings: a local path, or a ``s3://`` / ``gs://`` URI (``file://`` becomes a local
path). Every read and write of a manifest or table goes through pyarrow filesystems.

The commit protocol (every stage):
1. ``begin``: the folder's manifest is replaced by a *running* marker before the first byte of
   output is written, so the old outputs are no longer trusted by anyone.
2. Outputs are written into a staging location: ``<folder>/.staging-<job>`` locally; on object stores,
   which cannot rename, a new versioned prefix ``<folder>/v-<id>``.
3. ``commit``: locally the staged outputs are renamed into ``<folder>``; on object stores the
   prefix simply stays. Then the *complete* manifest is written, naming its outputs (and the
   prefix) — the last write of the stage.
A reader (or a rerun deciding whether to reuse) accepts only a complete manifest whose
fingerprint matches and whose declared outputs all exist.

One writer per folder (``utilrag.lease``): ``begin`` first takes the folder's lease, and the commit
acts only while the lease is still this job's (locally under the folder's lock; on object storage
every manifest write after the running marker is conditional on it, and only the versions that
existed at ``begin`` are deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from utilrag import lease
from utilrag.errors import MissingInputError, UtilragError

MANIFEST = "manifest.json"
STAGING = ".staging"


def _fault(stage: str, point: str) -> None:
    """Fault injection for the kill-matrix tests: UTILRAG_FAULT_KILL=<stage>@<point> SIGKILLs this
    process at that point of the commit protocol (begin, commit, manifest);
    UTILRAG_FAULT_PAUSE=<stage>@<point>=<file> holds it there (touching <file>.waiting) until <file>
    exists, so that a test can run a second job meanwhile. Unset in normal use."""
    if os.environ.get("UTILRAG_FAULT_KILL") == f"{stage}@{point}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    where, _, gate = os.environ.get("UTILRAG_FAULT_PAUSE", "").partition("=")
    if gate and where == f"{stage}@{point}":
        Path(f"{gate}.waiting").touch()
        deadline = time.time() + 600
        while not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.1)


class IncompleteInputError(UtilragError):
    """A stage input exists but its manifest is not complete (running, failed) or does not match."""


# --------------------------------------------------------------------------- locations
def normalize(location: str | os.PathLike) -> str:
    text = str(location)
    if text.startswith("file://"):
        return text[len("file://") :] or "/"
    if "://" in text:
        stripped = text.rstrip("/")
        return stripped if "://" in stripped else text  # a bare "s3://" stays one (and is refused)
    return str(Path(os.path.expanduser(text)).absolute())


def is_remote(location: str) -> bool:
    return "://" in location


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a location; a location it cannot open is one line, not a traceback."""
    location = normalize(location)
    if not is_remote(location):
        return pafs.LocalFileSystem(), location
    scheme, _, rest = location.partition("://")
    if "?" in location or not rest:
        raise UtilragError(
            f"{location}: give object storage as scheme://bucket/path, without a query string "
            "(an S3-compatible endpoint goes in $AWS_ENDPOINT_URL)"
        )
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError: an unknown scheme, bad URI
        raise UtilragError(f"{location}: cannot open it ({e}); object storage is s3:// or gs://") from None


def join(location: str, *parts: str) -> str:
    return posixpath.join(location, *parts) if is_remote(location) else os.path.join(location, *parts)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def remove(location: str) -> None:
    """Delete a file or a folder (missing is fine)."""
    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def list_names(location: str) -> list[str]:
    """The names directly inside a folder (local or URI), sorted; none if it does not exist."""
    fs, path = filesystem(location)
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def upload_dir(local_dir: str | os.PathLike, location: str) -> None:
    """Copy a local folder's contents to a folder (a URI, or another local path)."""
    fs, path = filesystem(location)
    if not is_remote(location):
        shutil.copytree(local_dir, path, dirs_exist_ok=True)
        return
    pafs.copy_files(
        str(Path(local_dir).absolute()),
        path,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )


def upload_file(local_file: str | os.PathLike, location: str) -> None:
    """One local file to a location (a URI, or a local path: copied aside, then renamed into place)."""
    fs, path = filesystem(location)
    if not is_remote(location):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, path)
        return
    pafs.copy_files(
        str(Path(local_file).absolute()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def download_dir(location: str, local_dir: str | os.PathLike) -> None:
    fs, path = filesystem(location)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(
        path, str(Path(local_dir).absolute()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )


def file_stamp(location: str) -> str:
    """Size and modification time: enough to notice that a file given by path has changed."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    return f"{info.size}:{info.mtime}"


def read_text(location: str) -> str | None:
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:  # other I/O errors propagate: never mistaken for "no manifest"
        return f.read().decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Atomic: a reader sees the old text or the new, never a part (rename locally, one PUT remotely)."""
    fs, path = filesystem(location)
    if is_remote(location):
        with fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(location: str) -> dict | None:
    text = read_text(location)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- manifests
def code_version() -> str:
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from utilrag import __version__

    return __version__


def read_manifest(folder: str | os.PathLike) -> dict | None:
    return read_json(join(normalize(folder), MANIFEST))


def _write_manifest(folder: str, fields: dict, held: lease.Lease | None = None) -> dict:
    """``held``: the writer's lease; on S3 the write is then conditional on the manifest it last wrote."""
    manifest = {"code_version": code_version(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    if held is not None:  # which job wrote it; also makes each job's manifest (and so its ETag) its own
        manifest["writer"] = {k: held.record.get(k) for k in ("token", "host", "pid", "ray_job")}
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    if held is not None and hasattr(held.backend, "put_conditional"):
        held.manifest_etag = held.backend.put_conditional(join(folder, MANIFEST), text.encode(), held.manifest_etag)
    else:
        write_text(join(folder, MANIFEST), text)
    return manifest


def write_manifest(folder: str | os.PathLike, **fields) -> dict:
    """A manifest written directly (sub-stage bookkeeping such as annotation's <stage>.meta)."""
    return _write_manifest(normalize(folder), fields)


@dataclass
class SideStep:
    """A step inside a stage folder that keeps its own small manifest (annotation's ``inputs.meta``,
    ``chain.meta`` and ``<stage>.meta``, RAG's generation): reuse when complete under the same
    fingerprint, resume otherwise (``changed``: parts of another fingerprint must go first), begin,
    finish. The stage folder's own commit protocol and lease still guard the step."""

    meta: str  # the manifest's path
    fingerprint: str
    old: dict

    @classmethod
    def at(cls, meta: str | os.PathLike, fingerprint: str) -> SideStep:
        meta = normalize(meta)
        return cls(meta, fingerprint, read_manifest(meta) or {})

    def reusable(self, *outputs: str) -> dict | None:
        """The old manifest when the step completed under this fingerprint and its outputs exist."""
        ok = self.old.get("fingerprint") == self.fingerprint and self.old.get("status") == "complete"
        return self.old if ok and all(exists(o) for o in outputs) else None

    @property
    def changed(self) -> bool:
        """Another fingerprint ran here before: what it left is not this step's to resume."""
        return self.old.get("fingerprint") not in (None, self.fingerprint)

    def begin(self, **fields) -> dict:
        return write_manifest(self.meta, fingerprint=self.fingerprint, status="running", **fields)

    def finish(self, **fields) -> dict:
        return write_manifest(self.meta, fingerprint=self.fingerprint, status="complete", **fields)


@dataclass
class Committed:
    """A complete manifest and where its outputs are."""

    folder: str
    manifest: dict

    @property
    def base(self) -> str:
        prefix = self.manifest.get("prefix")
        return join(self.folder, prefix) if prefix else self.folder

    def path(self, name: str) -> str:
        return join(self.base, name)

    def local(self, name: str) -> str:
        """A local path of one output, for readers that need files (FAISS, Hugging Face): the output
        itself, or for object storage a copy in this node's cache. A committed version never changes,
        so a copy made once stays valid; it is downloaded aside and renamed into place, so two
        processes copying at once each see a whole copy."""
        if not is_remote(self.folder):
            return self.path(name)
        from utilrag.paths import cache_dir

        key = hashlib.sha256(f"{self.path(name)}@{self.manifest.get('written_at')}".encode()).hexdigest()[:16]
        root = cache_dir() / "remote" / key
        if not root.is_dir():
            tmp = root.with_name(f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            fs, path = filesystem(self.path(name))
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                download_dir(self.path(name), tmp / name)
            else:
                tmp.mkdir(parents=True)
                pafs.copy_files(
                    path, str(tmp / name), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
                )
            # the manifest beside the copy: a trained model's identity is its run's URI and fingerprint
            copy = {k: v for k, v in self.manifest.items() if k != "prefix"}
            copy.update(outputs=[name], copied_from=self.folder)
            (tmp / MANIFEST).write_text(json.dumps(copy, indent=2))
            try:
                os.rename(tmp, root)
            except OSError:  # another process finished first: its copy is as good
                shutil.rmtree(tmp, ignore_errors=True)
        return str(root / name)

    def has(self, name: str) -> bool:
        return name in self.manifest.get("outputs", [])

    def __getitem__(self, key: str):
        return self.manifest[key]

    def get(self, key: str, default=None):
        return self.manifest.get(key, default)


def _complete(folder: str) -> tuple[Committed | None, str]:
    """The folder's committed outputs, or None and why not."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None, "no manifest"
    status = manifest.get("status")
    if status != "complete" or "outputs" not in manifest:
        why = {
            "running": "its stage was interrupted or is still running",
            "failed": "its stage failed; see its log and rejects",
        }.get(status or "", "written by an older utilrag without a commit record; rerun the stage")
        return None, f"manifest status is {status!r} ({why})"
    committed = Committed(folder, manifest)
    missing = [name for name in manifest.get("outputs", []) if not exists(committed.path(name))]
    if missing:
        return None, f"declared outputs missing: {', '.join(missing)}"
    return committed, ""


def reusable(folder: str | os.PathLike, fingerprint: str) -> Committed | None:
    """The committed outputs of an earlier run with the same fingerprint, else None."""
    committed, _ = _complete(normalize(folder))
    if committed is None or committed.get("input_fingerprint") != fingerprint:
        return None
    return committed


def require(folder: str | os.PathLike, what: str) -> Committed:
    """A stage input: complete with all declared outputs, or one line saying which and why not."""
    folder = normalize(folder)
    committed, why = _complete(folder)
    if committed is None:
        error = MissingInputError if why == "no manifest" else IncompleteInputError
        raise error(f"{what}: {why} at {join(folder, MANIFEST)} (run the stage that makes it)")
    return committed


@dataclass
class StageWriter:
    """Outputs being written for one folder: ``path(name)`` inside the staging location, then ``commit``."""

    folder: str
    stage: str
    fingerprint: str | None
    staging: str
    prefix: str | None
    previous: list[str] = field(default_factory=list)
    committed: Committed | None = None
    scratch: str | None = None  # object storage: local files to upload into the staging prefix at commit
    held: lease.Lease | None = None  # the folder's lease (utilrag.lease)
    owns_lease: bool = False  # taken by begin (released at commit) rather than around the whole stage
    old_versions: list[str] = field(default_factory=list)  # object storage: the v-* prefixes at begin

    def path(self, name: str) -> str:
        return join(self.staging, name)

    def local_path(self, name: str) -> Path:
        """For writers that need a local file (matplotlib, pq.write_table of a report): inside the
        staging folder locally; on object storage in a local scratch folder uploaded at commit."""
        if is_remote(self.staging):
            if self.scratch is None:
                self.scratch = tempfile.mkdtemp(prefix=f"utilrag-{slug(self.stage)}-")
            path = Path(self.scratch, name)
        else:
            path = Path(self.path(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, status: str = "complete", **fields) -> Committed:
        if self.scratch is not None:
            upload_dir(self.scratch, self.staging)
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        _fault(self.stage, "commit")  # outputs staged, nothing moved
        with self.held.fenced() if self.held else contextlib.nullcontext():
            committed = self._commit(status, fields)
        if self.held is not None and self.owns_lease:
            try:
                self.held.release()
            except Exception as e:  # noqa: BLE001 - committed; a rerun takes a dead holder's lease over
                from utilrag.logs import get_logger

                get_logger("store").warning(f"{self.folder}: committed, but the lease was not released ({e})")
        return committed

    def _commit(self, status: str, fields: dict) -> Committed:
        fs, staging = filesystem(self.staging)
        infos = fs.get_file_info(pafs.FileSelector(staging, allow_not_found=True))
        outputs = sorted(posixpath.basename(i.path) for i in infos)
        # Whatever happens from here on, the next run knows every name this folder may now hold.
        _write_manifest(
            self.folder,
            {
                "stage": self.stage,
                "status": "running",
                "input_fingerprint": self.fingerprint,
                "previous_outputs": sorted(set(self.previous) | set(outputs)),
            },
            self.held,
        )
        for name in self.previous:  # the old run's outputs that this one does not write again
            if name not in outputs:
                remove(join(self.folder, name))
        if self.prefix is None:  # local: rename each staged output into the folder
            for name in outputs:
                target = join(self.folder, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.unlink(target)
                os.replace(join(self.staging, name), target)
            shutil.rmtree(self.staging, ignore_errors=True)
        _fault(self.stage, "manifest")  # outputs in place, manifest still says running
        manifest = _write_manifest(
            self.folder,
            {
                "stage": self.stage,
                "status": status,
                "input_fingerprint": self.fingerprint,
                **({"prefix": self.prefix} if self.prefix else {}),
                "outputs": outputs,
                **fields,
            },
            self.held,
        )
        if self.prefix is not None:  # only versions older than this job's begin: never a later job's
            _remove_versions(self.folder, [v for v in self.old_versions if v != self.prefix])
        self.committed = Committed(self.folder, manifest)
        return self.committed


def _versions(folder: str) -> list[str]:
    """The versioned prefixes (v-<id>) in an object-storage folder."""
    fs, path = filesystem(folder)
    return sorted(
        posixpath.basename(info.path)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if re.fullmatch(r"v-[0-9a-f]{12}", posixpath.basename(info.path)) and info.type == pafs.FileType.Directory
    )


def _remove_versions(folder: str, names: list[str]) -> None:
    fs, path = filesystem(folder)
    for name in names:
        fs.delete_dir(posixpath.join(path, name))


def begin(folder: str | os.PathLike, stage: str, fingerprint: str | None, **fields) -> StageWriter:
    """Take the folder's lease (one line and exit 2 if another live job holds it), invalidate the old
    outputs (running marker), clear stale staging, return the writer."""
    folder = normalize(folder)
    owns = lease.held(folder) is None  # else the stage holds it around more than this commit (annotate)
    held = lease.acquire(folder, stage)
    with held.fenced():
        old = read_manifest(folder) or {}
        previous = list(old.get("outputs", [])) if not old.get("prefix") else []
        previous += old.get("previous_outputs", [])  # from a run killed after its own marker
        _write_manifest(
            folder,
            {
                "stage": stage,
                "status": "running",
                "input_fingerprint": fingerprint,
                "previous_outputs": previous,
                **fields,
            },
            held,
        )
        old_versions: list[str] = []
        if is_remote(folder):  # older versions stay until this one commits: a reader may still hold one
            old_versions = _versions(folder)
            version = f"v-{uuid.uuid4().hex[:12]}"
            prefix: str | None = version
            staging = join(folder, version)
        else:  # a staging folder of this job's own: one whose lease lapsed must not write into ours
            prefix = None
            for name in os.listdir(folder):  # earlier jobs' staging, whoever they were: we hold the folder
                if name == STAGING or name.startswith(f"{STAGING}-"):
                    shutil.rmtree(join(folder, name), ignore_errors=True)
            staging = join(folder, f"{STAGING}-{held.token[:12]}")
            os.makedirs(staging, exist_ok=True)
    _fault(stage, "begin")  # old outputs invalidated, nothing written
    return StageWriter(
        folder,
        stage,
        fingerprint,
        staging,
        prefix,
        sorted(set(previous)),
        held=held,
        owns_lease=owns,
        old_versions=old_versions,
    )


# --------------------------------------------------------------------------- layout
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip("/")).strip("_")[-80:]


class Store:
    """The output layout of one run directory (``output_dir``)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.root = normalize(output_dir)

    def _at(self, *parts: str) -> str:
        return join(self.root, *parts)

    def ingest(self, dataset: str) -> str:
        return self._at("ingest", dataset)

    def pools(self, dataset: str, split: str) -> str:
        return self._at("pools", f"{dataset}-{split}")

    def bm25(self, dataset: str, split: str | None) -> str:
        return self._at("bm25", f"{dataset}-{split}")

    def querygen(self, dataset: str, part: str) -> str:
        """pool (the sampled passages), questions (the chain's output), queries (what later stages read)."""
        return self._at("querygen", dataset, part)

    def judge(self, dataset: str, split: str, part: str) -> str:
        """pool (the runs' top passages), grades (the chain's output), qrels (what evaluate reads)."""
        return self._at("judge", f"{dataset}-{split}", part)

    def annotate(self, dataset: str, split: str, output_name: str | None = None) -> str:
        suffix = f"-{output_name}" if output_name else ""
        return self._at("annotate", f"{dataset}-{split}{suffix}")

    def train(self, name: str) -> str:
        return self._at("train", name)

    def embeddings(self, dataset: str, model: str) -> str:
        return self._at("index", dataset, slug(model), "embeddings")

    def faiss(self, dataset: str, model: str, index_type: str, shards: int) -> str:
        return self._at("index", dataset, slug(model), f"faiss-{index_type}-{shards}shards")

    def dense_run(self, dataset: str, split: str | None, label: str) -> str:
        return self._at("dense", f"{dataset}-{split or 'all'}", label)

    def evaluate(self) -> str:
        return self._at("evaluate")

    def rag(self, dataset: str, part: str) -> str:
        return self._at("rag", dataset, part)

    def report(self) -> str:
        return self._at("report")
