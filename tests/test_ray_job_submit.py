"""Integration: a real `ray start --head` on 127.0.0.1, `ray job submit` of jobs/submit.py ingest, Parquet checked,
and the cluster this test started stopped again (only its own processes: other tests' Ray stays up)."""

import os
import shutil
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ray_job_submit, start_ray_head, stop_cluster
from utilrag.config import REPO_ROOT
from utilrag.data.tables import read_table
from utilrag.store import read_manifest


@pytest.mark.slow
def test_ray_job_submit_ingest(shared_datasets, tmp_path):
    temp_dir, gcs, dash, env = start_ray_head(dashboard=True)
    ray = os.path.join(str(Path(sys.executable).parent), "ray")
    try:
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
        submit = ray_job_submit(command, env, temp_dir)
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
