"""Shared fixtures: the real datasets beside the checkout, one local Ray cluster per session."""

from __future__ import annotations

import gzip
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest
import yaml

from readiness import NotReady, log_tail, wait_http, wait_until
from utilrag.config import load_config
from utilrag.paths import REPO_ROOT

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


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer (~1M parameters): the tests of
    a training run's control (kills, resumes, commits, object storage) train, checkpoint and resume it
    for real in a few MB, where MiniLM's checkpoints with Adam state are ~350 MB each."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from utilrag.encoder_spec import resolve_model

    folder = tmp_path_factory.mktemp("tiny-encoder")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("sentence-transformers/all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


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
    # 3 s of grace: the GCS server and the autoscaler's monitor outlive a SIGTERM sent to the whole
    # cluster at once (seen: still up after 15 s), and a test's cluster keeps nothing worth a clean exit.
    _, alive = psutil.wait_procs(ours, timeout=3)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=15)


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
    command = [
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
    ]
    try:  # a head whose start fails is stopped before the error is raised: no fixture teardown runs then
        try:
            # `ray start` returns once the head's GCS and raylet are up; patient, as two busy cores need.
            start = subprocess.run(
                command,
                env={**env, **(extra_env or {})},
                capture_output=True,
                text=True,
                timeout=300,
                start_new_session=new_session,
            )
        except subprocess.TimeoutExpired as e:
            raise NotReady(f"`ray start --head` did not return in 300s\n{log_tail(ray_logs(temp_dir))}") from e
        if start.returncode != 0:
            raise NotReady(f"`ray start --head` failed: {start.stderr[-2000:]}\n{log_tail(ray_logs(temp_dir))}")
        if dashboard:  # the dashboard comes up after `ray start` returns: callers list nodes and submit jobs
            wait_http(
                f"http://127.0.0.1:{dash}/api/version",
                "the Ray dashboard",
                deadline_s=180,
                logs=ray_logs(temp_dir, "dashboard.log"),
            )
    except BaseException:
        stop_cluster_group(temp_dir) if new_session else stop_cluster(temp_dir)
        raise
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


def wait_paused(proc: subprocess.Popen, gate: Path, deadline_s: float = 300) -> None:
    """Until a run started with UTILRAG_FAULT_PAUSE=<stage>@<point>=<gate> is held there (it touches
    <gate>.waiting); its output, in <gate>.log, if it exits first or the deadline passes."""

    def paused(_: float) -> bool | None:
        return True if Path(f"{gate}.waiting").exists() else None

    wait_until(
        f"the run held at {gate}", paused, deadline_s=deadline_s, logs=[f"{gate}.log"], process=proc, pause_s=0.1
    )


def ray_logs(temp_dir: str, *names: str) -> list[Path]:
    """A cluster's log files (``names`` under its session's logs/, or the head's main ones), for failure messages."""
    logs = Path(temp_dir) / "session_latest" / "logs"
    return [logs / n for n in (names or ("gcs_server.out", "raylet.out", "dashboard.log"))]


# What `ray job submit` prints while the head's job API is not up yet: the dashboard not answering, or
# its job agent not yet registered (the dashboard's own 10 s wait for it ran out). Nothing was submitted
# then (no "submitted successfully": a job's own log, printed after that line, may say anything), so
# submitting again is safe.
JOB_API_NOT_UP = ("No available agent", "Failed to connect to Ray", "Connection refused", "ConnectionError")


def ray_job_submit(command: list[str], env: dict, temp_dir: str, *, deadline_s: float = 300, timeout: int = 600):
    """`ray job submit …` of the cluster in ``temp_dir``, submitted again while the head's job API is
    still coming up (seconds after `ray start` on an idle machine, minutes on two busy cores), until
    ``deadline_s``; then one error with the dashboard's and the job agent's logs. Returns the finished
    `ray job submit` process."""

    def submit(_: float) -> subprocess.CompletedProcess:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
        output = proc.stderr + proc.stdout
        submitted = "submitted successfully" in output
        if proc.returncode != 0 and not submitted and any(s in output for s in JOB_API_NOT_UP):
            raise RuntimeError(output[-500:])
        return proc

    logs = ray_logs(temp_dir, "dashboard.log", "dashboard_agent.log")
    # A `ray job submit` that runs past ``timeout`` is a job that hangs, not a job API coming up.
    return wait_until(
        "the Ray job API (`ray job submit`)",
        submit,
        deadline_s=deadline_s,
        logs=logs,
        pause_s=2.0,
        fatal=(subprocess.TimeoutExpired,),
    )


# --------------------------------------------------------------------------- an S3-compatible server
S3_BUCKET = "utilrag-test"
S3_SECRET = f"fake-secret-{uuid.uuid4().hex}"  # tests check that it appears in no output


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """moto_server (a real S3-compatible server) on 127.0.0.1 in its own process group, with the bucket
    S3_BUCKET; the S3 settings every client (and a Ray head started after it, so its workers) reads."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "utilrag-test-key",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    try:  # a setup that fails stops the server it started (a teardown does not run then)
        wait_http(endpoint, "moto_server (S3)", deadline_s=120, logs=[log], process=server)
        os.environ.update(env)
        wait_until(
            f"bucket {S3_BUCKET} on moto_server", _create_bucket(endpoint), deadline_s=120, logs=[log], process=server
        )
    except BaseException:
        _restore(saved)
        _stop_server(server)
        raise
    yield env
    _restore(saved)
    _stop_server(server)


def _create_bucket(endpoint: str):
    def create(timeout: float) -> bool:
        s3 = pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme="http",
            allow_bucket_creation=True,
            connect_timeout=timeout,
            request_timeout=timeout,
        )
        s3.create_dir(S3_BUCKET)  # a bucket already there (an earlier try's, answered late) is fine
        return True

    return create


def _restore(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _stop_server(server: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
