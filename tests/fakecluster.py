"""A fake multi-node cluster's state and its faults, read the way the autoscaler and Ray's state API
see them: shared by tests/test_autoscaling.py and benchmarks/rehearsal.py (which start the cluster
with conftest.start_ray_head and Ray's fake_multinode provider)."""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path

import psutil

# How fast a fake cluster notices a lost node: GCS health checks every second, dead after 5 misses (Ray's
# default: every 3 s).
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


def autoscaler_env(heartbeat_timeout_s: float) -> dict[str, str]:
    """The fake provider's head environment: the autoscaler checks every second (its floor) and takes a
    node it has not heard from for ``heartbeat_timeout_s`` as lost (30 s by default)."""
    return {
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(max(1, round(heartbeat_timeout_s))),
    }


def get(obj, name):
    """A field of a state-API record (a dict or an object, by Ray version)."""
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def nodes(address: str) -> list:
    from ray.util.state import list_nodes

    return list_nodes(address=address, detail=True, limit=1000, raise_on_missing_output=False)


def replicas(address: str) -> list:
    """The annotation replicas (Ray Data's actors of the chain's annotator)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, detail=True, limit=10000, raise_on_missing_output=False)
    return [a for a in actors if "ChainAnnotator" in (get(a, "class_name") or "")]


def node_type(node, config: dict) -> str:
    """The node type whose resources the node has (the fake provider does not label the type)."""
    total = get(node, "resources_total") or {}
    own = {k: v for k, v in total.items() if k in ("CPU", "GPU") or k.startswith("accelerator_type:")}
    for name, spec in config["available_node_types"].items():
        if own == {k: v for k, v in spec["resources"].items() if v}:
            return name
    return f"unknown {own}"


def kill_node(temp_dir: str, node_id: str) -> list[str]:
    """SIGKILL every process of one fake node of this cluster at once: those that carry the node's id in
    RAY_OVERRIDE_NODE_ID_FOR_TESTING (set by the fake provider: its raylet, agents, workers) and all
    their descendants (vLLM's subprocesses, if any). Returns their names."""
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        if not any(temp_dir in part for part in (p.info["cmdline"] or [])):
            continue
        try:
            if p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    victims = {p.pid: p for p in roots}
    for p in roots:
        try:
            victims.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    names = []
    for p in victims.values():
        try:
            names.append(p.name())
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return names


def monitor_log(temp_dir: str) -> Path:
    return Path(temp_dir) / "session_latest" / "logs" / "monitor.log"


def launches(temp_dir: str) -> Counter:
    """Nodes the autoscaler launched, by type, from its monitor.log: a launcher line may start several
    (v1: "Launching 2 nodes, type T.", v2: "Launching 1 nodes of type T.")."""
    found: Counter = Counter()
    path = monitor_log(temp_dir)
    text = path.read_text(errors="replace") if path.exists() else ""
    for n, kind in re.findall(r"Launching (\d+) nodes(?:, type| of type) ([\w.-]+?)\.", text):
        found[kind] += int(n)
    return found


def cluster_processes(temp_dir: str) -> list:
    """The processes that name this cluster's temp dir (its head's and its fake nodes')."""
    return [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in c for c in (p.info["cmdline"] or []))]


def autoscaler_v2(config: dict) -> dict[str, str]:
    """Autoscaler v2 (what `ray up` runs in Ray 2.60, and KubeRay) on Ray's fake provider, set up as
    ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True) does it: ``config``'s provider gains the head's
    fixed node id and one launch per node; returns the head's environment. The provider is loaded as an
    "external" one: v2 fills a fake_multinode config in from that type's defaults file
    (fake_multi_node/example.yaml), which the 2.60 wheel does not ship."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    config["provider"].update(
        type="external",
        module="ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
        head_node_id=FAKE_HEAD_NODE_ID,
        launch_multiple=True,
    )
    return {
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
    }


def terminated(temp_dir: str) -> tuple[list[str], Counter]:
    """Autoscaler v2's removals from its monitor.log: the node ids it terminated, and the idle removals by
    type ("Removing 1 nodes of type T (idle)."); a lost node is terminated without an idle line."""
    path = monitor_log(temp_dir)
    text = path.read_text(errors="replace") if path.exists() else ""
    idle: Counter = Counter()
    for n, kind in re.findall(r"Removing (\d+) nodes of type ([\w.-]+) \(idle\)", text):
        idle[kind] += int(n)
    return re.findall(r"NodeProvider: (\S+): Terminating node", text), idle


def start_fake_cluster(
    config: dict, folder: Path, heartbeat_timeout_s: float, v2: bool = True
) -> tuple[str, int, int, dict, dict]:
    """A CPU-less head (its own session and process group) whose autoscaler runs Ray's fake provider on
    ``config`` (its node types; the head's GCS port is filled in, the config written into ``folder``).
    Returns (temp_dir, gcs port, dashboard port, env for clients, the config as run). Stop it with
    conftest.stop_cluster_group(temp_dir)."""
    import json

    import yaml

    from conftest import free_port, start_ray_head

    gcs = free_port()
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"  # the fake nodes join this head, not 6379
    head_env = autoscaler_env(heartbeat_timeout_s)
    if v2:
        head_env.update(autoscaler_v2(config))
    autoscaling = folder / "autoscaling.yaml"
    autoscaling.write_text(yaml.safe_dump(config))
    temp_dir, gcs, dash, env = start_ray_head(
        dashboard=True,
        num_cpus=0,
        extra_args=(
            "--num-gpus=0",
            f"--autoscaling-config={autoscaling}",
            f"--system-config={json.dumps(SYSTEM_CONFIG, separators=(',', ':'))}",
        ),
        extra_env=head_env,
        gcs_port=gcs,
        new_session=True,
    )
    return temp_dir, gcs, dash, env, config
