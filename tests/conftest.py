"""Shared fixtures: the real datasets beside the checkout, one local Ray cluster per session."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import yaml

from utilrag.config import REPO_ROOT, load_config

SHARED = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED / "scifact").is_dir():
        pytest.skip(f"real datasets not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def make_config(tmp_path):
    """Write a pipeline config for the given sections and load it (overrides as key=value)."""

    def make(sections: dict, overrides: list[str] = ()):
        sections = {"output_dir": str(tmp_path / "out"), **sections}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(sections))
        return load_config(path, list(overrides))

    return make


def write_lines(path: Path, lines: list[bytes | str], compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\n" for ln in lines)
    if compress:
        data = gzip.compress(data)
    path.write_bytes(data)
    return path
