"""Shared fixtures: the real datasets beside the checkout, one local Ray cluster per session."""

from __future__ import annotations

import gzip
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
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


WORDS = (
    "protein cell gene virus immune cancer brain heart blood drug trial dose risk age diet sleep stress "
    "lung liver bone muscle skin kidney vaccine insulin obesity"
).split()


# A training section small enough for tests on the tiny dataset (one worker, a few steps).
TINY_TRAIN = {
    "dataset": "tiny",
    "split": "train",
    "query_max_len": 8,
    "passage_max_len": 16,
    "group_size": 4,
    "per_device_queries": 4,
    "num_workers": 1,
    "epochs": 1,
}


@pytest.fixture
def tiny_dataset(tmp_path):
    """24 queries, 120 passages, 1-2 positives each: an MS MARCO layout small enough to train on here."""
    rng = random.Random(0)
    docs, queries, qrels = [], [], []
    for d in range(120):
        docs.append(f"{d}\t" + " ".join(rng.choice(WORDS) for _ in range(12)))
    for q in range(24):
        pos = rng.sample(range(120), rng.choice([1, 2]))
        words = docs[pos[0]].split("\t")[1].split()[:4]
        queries.append(f"q{q}\twhat about {' '.join(words)}")
        qrels += [f"q{q} 0 {d} 1" for d in pos]
    root = tmp_path / "tiny"
    write_lines(root / "collection.tsv", docs)
    write_lines(root / "queries.train.tsv", queries)
    write_lines(root / "qrels.train.tsv", qrels)
    return root


# --------------------------------------------------------------------------- a `ray start` cluster of our own
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    ours = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in part for part in (p.info["cmdline"] or []))]
    for p in ours:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=15)
    for p in alive:
        p.kill()


def own_port_args(*extra: str) -> list[str]:
    """`ray start` flags giving a node's agents and managers free ports of their own (the session's Ray
    holds the defaults); ``extra``: more port flags (the head's client server)."""
    flags = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
        *extra,
    )
    return [f"--{flag}={free_port()}" for flag in flags]


def start_ray_head(
    dashboard: bool = False,
    *,
    num_cpus: int = 2,
    extra_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    gcs_port: int | None = None,
    new_session: bool = False,
) -> tuple[str, int, int, dict]:
    """`ray start --head` on 127.0.0.1 with every port its own (the session's Ray holds the
    defaults); returns (temp_dir, gcs port, dashboard port, env for clients). Stop it with
    stop_cluster(temp_dir), never `ray stop`. extra_args / extra_env go to `ray start` (and so to
    the head's processes); gcs_port: a port chosen beforehand (free_port()); new_session: the head's
    processes in their own session and process group (see stop_cluster_group)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    gcs, dash = gcs_port or free_port(), free_port()
    own_ports = own_port_args("ray-client-server-port")
    dashboard_args = (
        ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)] if dashboard else ["--include-dashboard=false"]
    )
    start = subprocess.run(
        [
            os.path.join(bin_dir, "ray"),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            *dashboard_args,
            "--num-cpus",
            str(num_cpus),
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            *own_ports,
            *extra_args,
        ],
        env={**env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=new_session,
    )
    if start.returncode != 0:
        stop_cluster(temp_dir)
        raise RuntimeError(start.stderr[-2000:])
    return temp_dir, gcs, dash, env


def stop_cluster_group(temp_dir: str) -> None:
    """stop_cluster(temp_dir), then SIGKILL what is left in the process groups of that cluster's
    processes: for a head started with new_session=True, also the processes whose command line does
    not name the temp dir (vLLM's engine-core subprocesses, the nodes an autoscaler started).
    Never this test's own process group."""
    groups = set()
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in (p.info["cmdline"] or [])):
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
    stop_cluster(temp_dir)
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, 9)
        except ProcessLookupError:
            pass


def ray_job_submit(command: list[str], env: dict, tries: int = 10, pause_s: float = 2.0, timeout: int = 600):
    """`ray job submit …`, retried while the head's job agent is still coming up (it starts a few
    seconds after `ray start` returns)."""
    import time

    for _ in range(tries):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
        if "No available agent" not in proc.stderr + proc.stdout:
            break
        time.sleep(pause_s)
    return proc
