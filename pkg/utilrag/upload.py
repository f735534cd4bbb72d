"""``utilrag upload``: put a registered dataset, a local file tree or a model where a cluster reads it
(a bucket, or a shared path), once, and print the override that points a config at it.

    utilrag upload scifact --to s3://bucket/utilrag            # data_root=s3://bucket/utilrag/datasets
    utilrag upload ./my-corpus --to s3://bucket/utilrag        # ingest.datasets.N.path=.../datasets/my-corpus
    utilrag upload Qwen/Qwen2.5-32B-Instruct-GPTQ-Int8 --revision <commit> --to s3://bucket/utilrag
                                                               # annotate.model=.../models/<name>

A model uploaded here is what the annotation and RAG replicas copy once per node
(``annotate.engine.stage_model``): one pull from the hub for the whole cluster, not one per replica.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from utilrag import store
from utilrag.errors import UtilragError
from utilrag.logs import get_logger

log = get_logger("upload")
KINDS = ("auto", "dataset", "files", "model")


class UploadError(UtilragError):
    """A source that cannot be found or a destination that cannot be written (one line, exit 2)."""


@dataclass
class Uploaded:
    kind: str
    source: str  # the local folder copied
    location: str  # where it now is
    files: int
    bytes: int
    seconds: float
    overrides: list[str] = field(default_factory=list)  # key=value lines for a config


def _kind(source: str, name: str | None) -> str:
    from utilrag.annotate.engine import PACKAGED_LLMS
    from utilrag.data.registry import REGISTRY

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "model"
        return "dataset" if (name or path.name) in REGISTRY else "files"  # a registered set's own copy
    if source in REGISTRY:
        return "dataset"
    if source in PACKAGED_LLMS or ("/" in source and not source.startswith((".", "/", "~"))):
        return "model"
    raise UploadError(f"upload {source!r}: no such folder, not a registered dataset and not a model name (owner/name)")


def _dataset_folder(name: str, data_root: str | None) -> tuple[Path, str]:
    """A registered dataset's local folder (downloaded there first when missing and online; or a
    folder given, holding a copy) and its folder name under a data root."""
    from utilrag.config import DatasetConfig
    from utilrag.data.registry import REGISTRY, resolve
    from utilrag.paths import resolve_data_root

    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve(), Path(name).name
    if name not in REGISTRY:
        raise UploadError(f"upload {name!r}: not a registered dataset ({', '.join(sorted(REGISTRY))}) nor a folder")
    root = resolve_data_root(data_root)
    if store.is_remote(root):
        raise UploadError(f"upload {name!r}: the data root {root} is already on object storage")
    if REGISTRY[name].kind == "qa":  # one question-answering file in its folder
        from utilrag.data.qa import resolve_qa

        folder = Path(resolve_qa(name, root, allow_download=True)).parent
    else:
        folder = Path(resolve(DatasetConfig(name=name), root).root)  # downloads a missing set, or says why not
    return folder, REGISTRY[name].folder or name


def _model_folder(name: str, revision: str | None) -> Path:
    """A model as a local Hugging Face folder: a folder given, a packaged model (converted once), or a
    hub name at a pinned revision (downloaded once into the hub's cache)."""
    from utilrag.annotate.engine import PACKAGED_LLMS, convert_gguf

    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if name in PACKAGED_LLMS:
        return convert_gguf(*PACKAGED_LLMS[name])
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision))
    except Exception as e:  # offline, no such repo, no access: the hub's own reason
        raise UploadError(f"upload {name!r}: cannot download it from the Hugging Face hub: {e}") from None


def _copy(local: Path, location: str) -> tuple[int, int, float]:
    """Every file under ``local`` to ``location``, file by file, with done/total, rate and ETA."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    done, t0, last = 0, time.time(), 0.0
    log.info(f"copying {len(files)} files ({total / 2**30:.2f} GiB) from {local} to {location}")
    for i, path in enumerate(files, 1):
        relative = path.relative_to(local).as_posix()
        target = store.join(location, *relative.split("/"))
        try:
            store.upload_file(str(path), target)
        except OSError as e:
            raise UploadError(f"upload: cannot write {target}: {e}") from None
        done += path.stat().st_size
        now = time.time()
        if now - last >= 5 or i == len(files):
            last = now
            rate = done / max(now - t0, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            log.info(
                f"{i}/{len(files)} files, {done / 2**30:.2f}/{total / 2**30:.2f} GiB, "
                f"{rate / 2**20:.1f} MiB/s, ETA {eta:.0f}s"
            )
    return len(files), total, time.time() - t0


def upload(
    source: str,
    to: str,
    kind: str = "auto",
    name: str | None = None,
    data_root: str | None = None,
    revision: str | None = None,
) -> Uploaded:
    """Copy ``source`` under ``to`` (``datasets/<name>`` or ``models/<name>``) and say how to use it."""
    if kind not in KINDS:
        raise UploadError(f"upload: --kind must be one of {', '.join(KINDS)}, not {kind!r}")
    kind = _kind(source, name) if kind == "auto" else kind
    to = to.rstrip("/")
    store.filesystem(to)  # a destination that cannot be opened: one line before anything is read
    if kind == "dataset":
        from utilrag.data.registry import REGISTRY

        local, folder = _dataset_folder(source, data_root)
        registered = REGISTRY.get(name or folder)
        if registered is not None:  # where the registry looks for it under a data root
            location = store.join(to, "datasets", *(registered.folder or name or folder).split("/"))
            overrides = [f"data_root={store.join(to, 'datasets')}"]
        else:  # not a registered name: the dataset is found by its path
            location = store.join(to, "datasets", name or folder)
            overrides = [f"ingest.datasets.N.path={location}   (N: the dataset's index in ingest.datasets)"]
    elif kind == "files":
        local = Path(source).expanduser().resolve()
        if not local.is_dir():
            raise UploadError(f"upload {source!r}: not a folder")
        location = store.join(to, "datasets", name or local.name)
        overrides = [f"ingest.datasets.N.path={location}   (N: the dataset's index in ingest.datasets)"]
    else:
        local = _model_folder(source, revision)
        if not (local / "config.json").is_file():
            raise UploadError(f"upload {source!r}: {local} has no config.json (not a Hugging Face model folder)")
        slug = name or (source.strip("/").replace("/", "--") if not Path(source).expanduser().is_dir() else local.name)
        location = store.join(to, "models", slug)
        overrides = [f"annotate.model={location}", f"rag.model={location}"]
    if not store.is_remote(location):
        try:
            os.makedirs(location, exist_ok=True)
        except OSError as e:
            raise UploadError(f"upload: cannot create {location}: {e.strerror or e}") from None
    files, size, seconds = _copy(local, location)
    return Uploaded(kind, str(local), location, files, size, round(seconds, 1), overrides)


def render(result: Uploaded) -> str:
    lines = [
        f"[upload] {result.kind}: {result.files} files, {result.bytes / 2**20:.1f} MiB from {result.source} "
        f"to {result.location} in {result.seconds:.1f}s",
        "use it with:",
        *(f"  {o}" for o in result.overrides),
    ]
    return "\n".join(lines)
