"""Every stage on object storage: a real S3-compatible server (moto's standalone server) on
127.0.0.1, `output_dir: s3://…` and the dataset read from the bucket too.

One pipeline run (ingest -> pools -> BM25 -> train -> index of the trained model -> evaluate ->
report) in which the driver is SIGKILLed after training, before the train commit; a rerun resumes
from the final checkpoint on S3 (Ray Train restores the run from its storage_path) and finishes; a
third run reuses every stage. A fake secret key in the environment appears in no output.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml

from conftest import S3_BUCKET, S3_SECRET, TINY_TRAIN, start_ray_head, stop_cluster, wait_paused
from utilrag.paths import REPO_ROOT

pytestmark = pytest.mark.slow

BUCKET, SECRET = S3_BUCKET, S3_SECRET  # the secret must never appear in any output


@pytest.fixture(scope="module")
def ray_head_with_s3(s3_env):
    temp_dir, gcs, _, env = start_ray_head()  # started with the S3 settings: its workers inherit them
    yield f"127.0.0.1:{gcs}", env
    stop_cluster(temp_dir)


def _fs() -> pafs.S3FileSystem:
    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]  # type: ignore[return-value]


def _objects(prefix: str, max_bytes: int = 4 << 20) -> dict[str, bytes]:
    """Every object under the prefix; the content of those up to max_bytes (manifests, tables, logs,
    plots), b"" for larger ones (weights and optimizer states, read back by the stages themselves)."""
    fs = _fs()
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            content = b""
            if info.size <= max_bytes:
                with fs.open_input_stream(info.path) as f:
                    content = f.read()
            found[info.path[len(BUCKET) + 1 :]] = content
    return found


def _upload(local: Path, key: str) -> None:
    with _fs().open_output_stream(f"{BUCKET}/{key}") as f:
        f.write(local.read_bytes())


def _config(tmp_path: Path, root: str, address: str, data: str, more: dict | None = None) -> Path:
    """A pipeline config writing to ``root``: the tiny dataset read from ``data``, its pools, and ``more``."""
    config = tmp_path / "config.yaml"
    sections = {
        "output_dir": root,
        "ray": {"address": address},
        "ingest": {"datasets": [{"name": "tiny", "path": data, "layout": "msmarco"}]},
        "pools": [{"dataset": "tiny", "split": "train", "size": 8}],
        **(more or {}),
    }
    config.write_text(yaml.safe_dump(sections))
    return config


def _all_reused(log: str, stage: str) -> bool:
    """The pipeline's line for the stage says every output was reused."""
    found = re.search(rf"\[pipeline\] {stage}: (\d+) output\(s\), (\d+) reused", log)
    assert found, (stage, log[-3000:])
    return found.group(1) == found.group(2)


def test_pipeline_on_s3_with_training_resumed_from_s3_checkpoints(
    ray_head_with_s3, tiny_dataset, tiny_encoder, tmp_path
):
    address, env = ray_head_with_s3
    for name in ("collection.tsv", "queries.train.tsv", "qrels.train.tsv"):
        _upload(tiny_dataset / name, f"data/tiny/{name}")
    root = f"s3://{BUCKET}/run"
    config = _config(
        tmp_path,
        root,
        address,
        f"s3://{BUCKET}/data/tiny",
        {
            "bm25": [{"dataset": "tiny", "split": "train", "k": 20}],
            "train": {  # one retriever per label setting: here one, "s3", indexed by index.trained_targets
                **TINY_TRAIN,
                "model": tiny_encoder,
                "settings": [{"name": "s3", "labels": "human"}],
                "pooling": "mean",
                "max_steps": 4,  # one checkpoint, the final one (to the S3 server): the rerun resumes from it
                "max_failures": 1,
            },
            "index": {
                "batch_size": 64,
                "shards": 2,
                "rows_per_file": 64,  # 120 passages: two embedding files, one per shard
                "k": 10,
                "trained_targets": [{"dataset": "tiny", "split": "train"}],  # model train:s3, read from S3
            },
            "evaluate": {  # + the "s3" retriever's run (evaluate.trained)
                "metrics": ["nDCG@10", "R@10"],
                "runs": [{"dataset": "tiny", "split": "train", "run": "bm25s"}],
            },
        },
    )
    cache = tmp_path / "cache"
    outputs: list[str] = []

    def pipeline(**faults: str) -> subprocess.CompletedProcess:
        run_env = {**env, "PYTHONPATH": str(REPO_ROOT / "pkg"), "UTILRAG_CACHE": str(cache), **faults}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "utilrag.cli", "pipeline", "--config", str(config)],
                env=run_env,
                capture_output=True,
                text=True,
                timeout=1800,  # ~3 min on an idle machine; patient for two cores shared with other work
            )
        except subprocess.TimeoutExpired as e:  # what the run had printed, for the diagnosis
            printed = "".join(
                t.decode(errors="replace") if isinstance(t, bytes) else t or "" for t in (e.stdout, e.stderr)
            )
            pytest.fail(f"the pipeline run did not end in {e.timeout}s; its output:\n{printed[-5000:]}")
        outputs.append(proc.stdout + proc.stderr)
        return proc

    # 1. The driver is killed once training is over, before the train stage commits.
    first = pipeline(UTILRAG_FAULT_KILL="train@commit")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert "s3: human step 4/4 (4/4 steps, 100%)" in first.stdout, first.stdout[-2000:]  # read back from S3
    checkpoints = [k for k in _objects("run/train/s3/ray_results") if "/checkpoint_" in k]
    assert checkpoints, "no checkpoint on S3"
    # 2. The rerun reuses ingest/pools/BM25, resumes training from the final checkpoint on S3 (no
    #    step trained again), commits, indexes the trained model read back from S3, evaluates.
    second = pipeline()
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    for stage in ("ingest", "pools", "bm25"):
        assert _all_reused(log, stage)
    assert "step 4/4" not in log  # resumed from the last checkpoint, nothing retrained
    objects = _objects("run")
    train_manifest = yaml.safe_load(objects["run/train/s3/manifest.json"])
    assert train_manifest["status"] == "complete"
    prefix = f"run/train/s3/{train_manifest['prefix']}"
    assert f"{prefix}/model/model.safetensors" in objects and f"{prefix}/model/encoder_spec.json" in objects
    assert len(objects[f"{prefix}/loss.png"]) > 1000
    metrics = pd.read_csv(pd.io.common.BytesIO(objects[f"{prefix}/metrics.csv"]))
    assert sorted(set(metrics["global_step"])) == [1, 2, 3, 4] and metrics["loss"].notna().all()
    assert not [k for k in objects if ".staging" in k]  # object stores: versioned prefixes, no staging
    assert not [k for k in objects if "/ray_results/" in k and "/data/" in k]  # group files gone with the commit
    evaluate = yaml.safe_load(objects["run/evaluate/manifest.json"])
    scores = {r["label"]: r["nDCG@10"] for r in evaluate["results"]}
    assert set(scores) == {"bm25s", "s3"} and all(0 < s <= 1 for s in scores.values())
    faiss = [k for k in objects if k.endswith(".faiss")]
    assert len(faiss) == 2 and all(k.startswith("run/index/tiny/train_s3/") for k in faiss)
    # 3. Nothing changed: every stage is reused (evaluation is always recomputed: it is cheap).
    third = pipeline()
    assert third.returncode == 0, third.stderr[-3000:]
    log = third.stdout + third.stderr
    for stage in ("ingest", "pools", "bm25", "train", "index"):
        assert _all_reused(log, stage)
    assert _objects("run/evaluate")["run/evaluate/manifest.json"] != objects["run/evaluate/manifest.json"]
    # The secret key was in every process's environment; it is in no output, log, table, manifest or plot.
    everything = [o.encode() for o in outputs] + list(_objects("").values())
    everything += [p.read_bytes() for p in cache.rglob("*") if p.is_file()]
    assert not [b for b in everything if SECRET.encode() in b]


def test_one_writer_per_stage_folder_on_s3(ray_head_with_s3, tiny_dataset, tmp_path):
    """Two `utilrag pools` runs on one s3:// output directory at once: the second exits 2 with one line
    naming the holder (the lease's If-None-Match: * create failed), the first commits what a clean run
    commits; a holder SIGKILLed at its begin is taken over at once by the rerun (If-Match on its ETag)."""
    import json

    from utilrag.lease import LEASE

    address, env = ray_head_with_s3
    root = f"s3://{BUCKET}/lease-run"
    config = _config(tmp_path, root, address, str(tiny_dataset))

    def command(stage: str, *overrides: str, **faults: str) -> tuple[list[str], dict]:
        run_env = {**env, "PYTHONPATH": str(REPO_ROOT / "pkg"), "UTILRAG_CACHE": str(tmp_path / "cache"), **faults}
        return [sys.executable, "-m", "utilrag.cli", stage, "--config", str(config), *overrides], run_env

    def run(stage: str, *overrides: str, **faults: str) -> subprocess.CompletedProcess:
        args, run_env = command(stage, *overrides, **faults)
        return subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=900)

    def table() -> pd.DataFrame:
        manifest = json.loads(_objects("lease-run/pools")["lease-run/pools/tiny-train/manifest.json"])
        assert manifest["status"] == "complete", manifest
        key = f"{BUCKET}/lease-run/pools/tiny-train/{manifest['prefix']}/pools.parquet"
        return pd.read_parquet(key, filesystem=_fs())

    lease_key = f"lease-run/pools/tiny-train/{LEASE}"
    assert run("ingest").returncode == 0
    assert run("pools", "pools.0.seed=7").returncode == 0
    clean = table()
    assert run("pools", "pools.0.seed=0").returncode == 0

    gate = tmp_path / "gate"
    args, run_env = command("pools", "pools.0.seed=7", UTILRAG_FAULT_PAUSE=f"pools@begin={gate}")
    with open(f"{gate}.log", "w") as printed:  # a file, not a pipe nobody reads while the run is held
        first = subprocess.Popen(args, env=run_env, stdout=printed, stderr=subprocess.STDOUT, text=True)
    try:
        wait_paused(first, gate)
        held = json.loads(_objects("lease-run/pools")[lease_key])
        assert held["pid"] == first.pid
        second = run("pools", "pools.0.seed=0")
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{root}/pools/tiny-train is being written by pools" in lines[0], lines
        assert f"pid {first.pid} on " in lines[0]
        assert json.loads(_objects("lease-run/pools")[lease_key])["token"] == held["token"]
        # `utilrag status` reads the manifests and the lease on the bucket: A is the live writer.
        seen = json.loads(run("status", "--json").stdout)
        assert seen["output_dir"] == root
        states = {f["folder"]: f for f in seen["folders"]}
        assert states["ingest/tiny"]["state"] == "complete"
        assert (
            states["pools/tiny-train"]["state"] == "running"
            and f"pid {first.pid} on " in states["pools/tiny-train"]["detail"]
        )
    finally:
        gate.touch()
    assert first.wait(timeout=900) == 0, Path(f"{gate}.log").read_text()[-3000:]
    assert table().equals(clean) and lease_key not in _objects("lease-run/pools")

    run("pools", "pools.0.seed=0", UTILRAG_FAULT_KILL="pools@begin")
    assert lease_key in _objects("lease-run/pools")
    again = run("pools", "pools.0.seed=7")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "took over the lease" in again.stdout + again.stderr
    assert table().equals(clean) and lease_key not in _objects("lease-run/pools")
    parts = [k.split("/") for k in _objects("lease-run/pools/tiny-train/")]
    versions = {p[3] for p in parts if len(p) > 4 and p[3].startswith("v-")}
    assert len(versions) == 1  # the killed run's and the older versions removed by the last commit
