"""Integration: a real `ray start --head` on 127.0.0.1, `ray job submit` of jobs/submit.py ingest, Parquet checked,
and the cluster this test started stopped again (only its own processes: other tests' Ray stays up)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from utilrag.config import REPO_ROOT
from utilrag.data.tables import read_table
from utilrag.store import read_manifest


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


@pytest.mark.slow
def test_ray_job_submit_ingest(shared_datasets, tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    gcs, dash = free_port(), free_port()
    # Every port of our own: the test session's other Ray cluster holds the defaults (e.g. the agent's 52365).
    own_ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
    ]
    ray = os.path.join(bin_dir, "ray")
    start = subprocess.run(
        [
            ray,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--num-cpus",
            "2",
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            *own_ports,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        out = tmp_path / "job-out"
        command = [
            ray,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dash}",
            "--working-dir",
            str(REPO_ROOT),
            "--",
            "python",
            "jobs/submit.py",
            "ingest",
            "--config",
            "jobs/configs/local.yaml",
            f"output_dir={out}",
            f"data_root={shared_datasets}",
        ]
        for _ in range(10):  # the head's job agent comes up a few seconds after `ray start` returns
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-2000:]
        assert "succeeded" in submit.stdout + submit.stderr
        assert read_table(out / "ingest" / "scifact" / "corpus").num_rows == 5183
        assert read_table(out / "ingest" / "trec-dl-2019" / "runs").num_rows == 17200
        assert read_manifest(out / "ingest" / "scifact")["status"] == "complete"
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    time.sleep(1)
    assert not [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in c for c in (p.info["cmdline"] or []))]
