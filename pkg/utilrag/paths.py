"""Where things are on this machine: the checkout, the data root of registered datasets, the cache."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(configured: str | None) -> str:
    """Where registered datasets live: config, then $UTILRAG_DATA_ROOT, then the shared
    datasets beside a checkout, then ~/.cache/utilrag/datasets. A URI (s3://, gs://) stays a URI."""
    given = configured or os.environ.get("UTILRAG_DATA_ROOT")
    if given:
        if "://" in given and not given.startswith("file://"):
            return given.rstrip("/")
        given = given[len("file://") :] if given.startswith("file://") else given
        return str(Path(os.path.expanduser(given)).resolve())
    shared = REPO_ROOT.parent / "shared" / "datasets"
    if shared.is_dir():
        return str(shared)
    return str(Path.home() / ".cache" / "utilrag" / "datasets")


def cache_dir() -> Path:
    path = Path(os.environ.get("UTILRAG_CACHE", Path.home() / ".cache" / "utilrag"))
    path.mkdir(parents=True, exist_ok=True)
    return path
