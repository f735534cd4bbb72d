"""The MS MARCO annotation job, rehearsed: the paper config's shape (msmarco-qwen32b.yaml's annotate
section: four stages, 31-passage pools in windows of 16, blocks of 64 queries, two in flight per
replica, GPU replicas of one A100-80G each, labelled node types, the async engine) on a fake
multi-node cluster, with time compressed by F, through the failures a GPU cluster brings.

    python benchmarks/rehearsal.py [--quick | --capped] [--queries N] [--F 60]

What is real: Ray (a `ray start` head with Ray's fake_multinode provider: its autoscaler starts and
removes labelled cpu / gpu node types as raylets on this machine, the AWS config's types with their
caps scaled down), Ray Data, the annotation stage's own code (utilrag.annotate.annotate_pools: the
inputs, the chain's replicas, parts, tries, reaper, lease, finalize and commit), the driver as its
own process. What is a STAND-IN, labelled as such: the engine (benchmarks/rehearsal_engine.py: an
engine-core child process as vLLM's, whose start takes the model load / F and whose latency is the
cost model's at the A100's rates / F, growing with the work in flight) and the data (synthetic
MS MARCO-shaped pools, benchmarks/annotate_scale.py).

Time compressed by F: the engine's load and per-request work, Ray Data's issue detectors
($UTILRAG_TIME_COMPRESSION), the no-progress guard (annotate.scale.no_progress_timeout_s / F), the
autoscaler's idle timeout (10 min / F) and heartbeat timeout (30 s / F), Ray's node health checks
(1 s x 5, against 3 s x 5 by default). NOT compressed (they run at their real speed, so they take F
times more of the rehearsal's compressed clock than they would of the real run's):
- a fake node's start (a raylet and its agents: seconds; a cloud GPU node: 5-15 min, / F = 5-15 s):
  about the same here, so the rehearsal's node launches are neither faster nor slower than the real
  ones compressed;
- a Ray actor's start and restart (worker process, imports: 1-3 s): replacements look F times slower
  than a real restart does; redone and lost work is counted in blocks, which this does not change;
- the autoscaler's update interval (1 s, its floor) and Ray Data's scheduling loop: decisions come
  later, in compressed time, than the real ones: more lag before a launch, never fewer launches;
- the data plane (prompt building, parsing, Parquet parts on 2 CPU cores): at 60 queries/s it may
  bound the rate, not the engine: the JSON says both rates.

During the run it injects: one replica whose engine fails its first start (marker file); one query
whose requests always raise (its text holds POISON); an engine-core process SIGKILLed (at ~15% of
the queries); a GPU node SIGKILLed, every process of it (at ~35%); the driver SIGKILLed (at ~60%)
and the job resubmitted. Last line, one JSON object (whole JSON in benchmarks/results/rehearsal*.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# --package (the negative control: another checkout's package, e.g. before a change) reaches the driver
# processes through this variable
sys.path.insert(0, os.environ.get("UTILRAG_REHEARSAL_PACKAGE") or str(ROOT / "pkg"))
sys.path.insert(0, str(ROOT / "tests"))  # the fake cluster's helpers (conftest, fakecluster)
sys.path.insert(0, str(ROOT / "benchmarks"))

PAPER_CONFIG = ROOT / "jobs" / "configs" / "msmarco-qwen32b.yaml"
FAKE_CLUSTER = ROOT / "tests" / "data" / "fake-multinode.yaml"
GPU_TYPE, CPU_TYPE = "gpu-a100-80g-x8", "cpu-ingest"
# The A100-80G's rates, scaled from the cost model's H100/H200 ones by bf16 dense peak (312 / 989
# TFLOPS) and, for decode, by memory bandwidth (2.0 / 3.35 TB/s): ~0.5 queries/s per replica.
A100_PREFILL_SCALE, A100_DECODE_SCALE = 312 / 989, 2.0 / 3.35
MODEL_LOAD_S = 600.0  # a 32B model's load onto one GPU, weights already on the node (10 min)
REPLICAS = 2  # the paper config's 16 replicas, scaled down (and 2 GPU nodes: 16 / 8 GPUs per p4de)
AUTOSCALER_V1 = "v1 (--autoscaler v1: it ignores node labels)"


def rates() -> dict:
    from utilrag.cost import Rates

    r = Rates()
    return {
        "prefill_tokens_per_s": r.prefill_tokens_per_s * A100_PREFILL_SCALE,
        "vllm_efficiency": r.vllm_efficiency,
        "decode_tokens_per_s": r.decode_tokens_per_s * A100_DECODE_SCALE,
    }


# --------------------------------------------------------------------------- the driver (its own process)
def driver(spec_path: str) -> None:
    """One submission of the job: the annotation stage's own code on the stand-in engine."""
    import ray.cloudpickle

    import rehearsal_engine
    from utilrag.annotate import Chain, annotate_config, annotate_pools
    from utilrag.config import load_config

    spec = json.loads(Path(spec_path).read_text())
    if os.environ.get("REHEARSAL_DEBUG_AUTOSCALING"):
        import logging

        logging.getLogger("ray.data._internal.cluster_autoscaler").setLevel(logging.DEBUG)
        logging.getLogger("ray.data._internal.cluster_autoscaler").addHandler(logging.StreamHandler())
    cfg = load_config(PAPER_CONFIG, spec["overrides"])
    acfg = annotate_config(cfg)
    rehearsal_engine.StandInEngine.settings = spec["engine"]
    ray.cloudpickle.register_pickle_by_value(rehearsal_engine)  # the replicas get the stand-in by value
    chain = Chain(
        out=spec["out"],
        paths=spec["paths"],
        pools_fingerprint="rehearsal",
        key={"dataset": "synthetic", "split": "train"},
        label="rehearsal",
        max_queries=None,
        sample_seed="rehearsal",
    )
    annotate_pools(cfg, acfg, chain, "stand-in", rehearsal_engine.StandInEngine)


# --------------------------------------------------------------------------- the rehearsal
class Watch:
    """Samples the drivers' RSS and the queries done (part footers) while the job runs."""

    def __init__(self, parts: Path):
        self.parts, self.done = parts, 0
        self.seen: set[str] = set()
        self.pids: list[int] = []
        self.peak_rss = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil
        import pyarrow.parquet as pq

        while not self.stop.wait(0.2):
            for pid in self.pids:
                try:
                    self.peak_rss = max(self.peak_rss, psutil.Process(pid).memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            if self.parts.is_dir():
                for f in self.parts.glob("part-*.parquet"):
                    if f.name not in self.seen:
                        try:
                            self.done += pq.read_metadata(f).num_rows
                            self.seen.add(f.name)
                        except Exception:  # noqa: BLE001 -- being written: the next round
                            pass


def engine_cores(folder: Path) -> list:
    """This rehearsal's stand-in engine cores (their stats file lies under ``folder``)."""
    import psutil

    from rehearsal_engine import CORE_MARKER

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = p.info["cmdline"] or []
            if CORE_MARKER in cmdline and any(str(folder) in part for part in cmdline):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def cluster_config(F: float) -> dict:
    import yaml

    config = yaml.safe_load(FAKE_CLUSTER.read_text())
    config["idle_timeout_minutes"] = 10 / F  # AWS: 10 min
    gpu = config["available_node_types"][GPU_TYPE]
    gpu["max_workers"] = REPLICAS + 1  # room for a replacement while a lost node is still listed
    config["available_node_types"][CPU_TYPE]["max_workers"] = 1
    config["max_workers"] = REPLICAS + 2
    return config


def start_driver(spec: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--driver", str(spec)],
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def rehearse(queries: int, F: float, work: Path, v2: bool = True) -> dict:
    import psutil
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from annotate_scale import synthetic
    from conftest import stop_cluster_group
    from fakecluster import get, kill_node, launches, node_type, nodes, replicas, start_fake_cluster

    t_start = time.time()
    data = work / "data"
    paths = synthetic(data, queries, ids_in_text=True)
    poison_id = poison_query(Path(paths["queries"]))
    engine_dir = work / "engine"
    engine_dir.mkdir()
    out = work / "out"
    temp_dir, gcs, dash, env, config = start_fake_cluster(cluster_config(F), work, 30 / F, v2)
    address = f"http://127.0.0.1:{dash}"
    overrides = [
        f"output_dir={out}",
        f"ray.address=127.0.0.1:{gcs}",
        "annotate.model=stand-in",
        f"annotate.scale.replicas=[{REPLICAS},{REPLICAS}]",
        f"annotate.scale.no_progress_timeout_s={3600 / F}",
        # the poison query's one error row stays within the budget (the paper config's 0.1% from 1,000
        # queries up; the threshold itself is tested in tests/test_annotate.py)
        f"annotate.scale.max_error_fraction={max(0.001, 2 / queries)}",
        f"annotate.scale.progress_every_s={max(1.0, 600 / F)}",
    ]
    spec = work / "driver.json"
    spec.write_text(
        json.dumps(
            {
                "overrides": overrides,
                "out": str(out / "annotate" / "synthetic-train"),
                "paths": paths,
                "engine": {
                    "folder": str(engine_dir),
                    "load_s": MODEL_LOAD_S / F,
                    "F": F,
                    "poison": "POISON",
                    **rates(),
                },
            }
        )
    )
    driver_env = {**env, "UTILRAG_TIME_COMPRESSION": str(F), "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    if os.environ.get("REHEARSAL_DATA_AUTOSCALER"):
        driver_env["RAY_DATA_CLUSTER_AUTOSCALER"] = os.environ["REHEARSAL_DATA_AUTOSCALER"]
    stage_dir = out / "annotate" / "synthetic-train"
    parts = stage_dir / "chain.parts"
    log = work / "driver.log"
    events: list[dict] = []
    actor_pids: set[int] = set()  # every replica process seen
    watch = Watch(parts)
    injected: list[str] = []
    try:
        first = start_driver(spec, driver_env, log)
        watch.pids.append(first.pid)
        proc, resubmitted, peak_gpu = first, False, 0
        resubmit_placed, fewest_gpu_nodes, old_pids = False, REPLICAS, set()
        deadline = time.time() + max(1800, queries / 5)
        while proc.poll() is None or not resubmitted:
            if time.time() > deadline:
                raise RuntimeError(f"the rehearsal did not finish in time; {log}")
            share = watch.done / queries
            try:
                alive = [a for a in replicas(address) if get(a, "state") == "ALIVE"]
                live_nodes = nodes(address)
            except Exception:  # noqa: BLE001 -- the state API under load: no decision this round
                time.sleep(0.25)
                continue
            for a in alive:
                if get(a, "pid"):
                    actor_pids.add(int(get(a, "pid")))
            gpu_alive = [n for n in live_nodes if get(n, "state") == "ALIVE" and node_type(n, config) == GPU_TYPE]
            peak_gpu = max(peak_gpu, len({get(a, "node_id") for a in alive}))
            if resubmitted and not resubmit_placed:
                # until the resubmitted job's replicas are up, idle GPU nodes may time out: it needs new ones
                fewest_gpu_nodes = min(fewest_gpu_nodes, len(gpu_alive))
                resubmit_placed = any(int(get(a, "pid") or 0) not in old_pids for a in alive)
            cores = [c for c in engine_cores(engine_dir) if c.is_running()]
            if "engine_core" not in injected and share >= 0.15 and cores:
                victim = cores[0]
                replica = victim.ppid()
                victim.send_signal(signal.SIGKILL)
                injected.append("engine_core")
                events.append({"what": "engine_core", "t": time.time(), "pids": [replica], "done": watch.done})
            elif "gpu_node" not in injected and share >= 0.35 and alive:
                node = get(alive[0], "node_id")
                pids = [int(get(a, "pid")) for a in alive if get(a, "node_id") == node and get(a, "pid")]
                killed = kill_node(temp_dir, node)
                injected.append("gpu_node")
                events.append(
                    {"what": "gpu_node", "t": time.time(), "pids": pids, "done": watch.done, "processes": len(killed)}
                )
            elif "driver" not in injected and share >= 0.60 and proc.poll() is None:
                pids = [int(get(a, "pid")) for a in alive if get(a, "pid")]
                old_pids = set(actor_pids)
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started itself
                proc.wait()
                injected.append("driver")
                events.append(
                    {
                        "what": "driver",
                        "t": time.time(),
                        "pids": pids,
                        "done": watch.done,
                        "gpu_nodes_alive": len(gpu_alive),
                    }
                )
                proc = start_driver(spec, driver_env, log)  # the resubmit
                watch.pids.append(proc.pid)
                resubmitted = True
            if proc.poll() is not None and not resubmitted:
                break  # the first driver ended before the driver kill (a failure, or a job too small)
            time.sleep(0.25)
        rc = proc.wait()
        wall = time.time() - t_start
        # After the job: Ray Data ends the replicas; their reapers must leave no core behind.
        time.sleep(5)
        orphans = len([c for c in engine_cores(engine_dir) if c.is_running()])
        launched = launches(temp_dir)
        for _ in range(20):  # the monitor writes its lines on its own time
            if launched[GPU_TYPE] >= peak_gpu:
                break
            time.sleep(0.5)
            launched = launches(temp_dir)
    finally:
        watch.stop.set()
        for p in [c for c in engine_cores(engine_dir)]:  # whatever happened, nothing of ours is left running
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        stop_cluster_group(temp_dir)

    manifest = json.loads((stage_dir / "manifest.json").read_text()) if (stage_dir / "manifest.json").exists() else {}
    ids = pc.cast(pq.read_table(parts, columns=["query_id"]).column("query_id"), "string") if parts.is_dir() else None
    errors_path = stage_dir / "errors.parquet"
    errors = pq.read_table(errors_path).column("query_id").to_pylist() if errors_path.exists() else []
    redone, lost_sets = redone_and_lost(engine_dir, events, parts, poison_id)
    lost = set().union(*lost_sets) if lost_sets else set()
    batch = paper_batch_size()
    needed = REPLICAS + sum(e["what"] == "gpu_node" for e in events)
    if "driver" in injected:  # the resubmit needs nodes again for those that idled out before it placed replicas
        needed += max(0, REPLICAS - fewest_gpu_nodes)
    fills = []
    for f in engine_dir.glob("fill-*.json"):
        try:
            fills.append(json.loads(f.read_text()))
        except (OSError, ValueError):  # a core killed mid-write left no whole file: its figures are lost
            pass
    area = sum(f["area"] / f["max_num_seqs"] for f in fills)
    alive_s = sum(f["alive"] for f in fills)
    summaries = manifest.get("summaries", {})
    r = rates()
    # the engine time per query the stand-in was asked for (its own token counts: characters / 4)
    prompt = sum(v.get("prompt_tokens", 0) for v in summaries.values())
    output = sum(v.get("output_tokens", 0) for v in summaries.values())
    done_queries = summaries.get("relsel", {}).get("queries", 0)
    per_query_s = (
        (prompt / (r["prefill_tokens_per_s"] * r["vllm_efficiency"]) + output / r["decode_tokens_per_s"]) / done_queries
        if done_queries
        else None
    )
    return {
        "engine": "STAND-IN (an engine-core child process; the cost model's A100-80G rates / F)",
        "completed": rc == 0 and manifest.get("status") == "complete",
        "expected": queries,
        "annotated": summaries.get("relsel", {}).get("queries", 0),
        "error_rows": len(errors),
        "poison_is_the_only_error_row": errors == [poison_id],
        "duplicates": (len(ids) - pc.count_distinct(ids).as_py()) if ids is not None else None,
        "parts_rows": len(ids) if ids is not None else 0,
        "gpu_nodes_launched": launched[GPU_TYPE],
        "cpu_nodes_launched": launched[CPU_TYPE],
        "gpu_nodes_needed": needed,
        "orphan_engines": orphans,
        "redone_queries": len(redone),
        "queries_in_flight_lost": len(lost),
        "redone_outside_lost": len(redone - lost),  # work redone that no kill explains (0: none)
        "redone_blocks": math.ceil(len(redone) / batch),
        "blocks_in_flight_lost": sum(math.ceil(len(x) / batch) for x in lost_sets),
        "failures_injected": ["engine_start", "poison_query", *injected],
        "events": [{k: v for k, v in e.items() if k != "pids"} | {"t": round(e["t"] - t_start, 1)} for e in events],
        "engine_fill": round(area / alive_s, 4) if alive_s else None,  # mean running / max_num_seqs
        "queries_per_s": round(queries / wall, 2),  # whole wall: cluster start, loads, recoveries included
        "engine_queries_per_s_modelled": round(REPLICAS * F / per_query_s, 2) if per_query_s else None,
        "driver_peak_rss_mib": round(watch.peak_rss / 2**20, 1),
        "wall_s": round(wall, 1),
        "F": F,
        "replicas": REPLICAS,
        "autoscaler": "v2 (Ray's fake provider as an external provider)" if v2 else AUTOSCALER_V1,
    }


def poison_query(queries_path: Path) -> str:
    """One query's text gets POISON: the stand-in raises on each of its requests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(queries_path)
    texts = table.column("text").to_pylist()
    index = len(texts) // 3
    texts[index] = texts[index] + " POISON"
    pq.write_table(table.set_column(1, "text", pa.array(texts, pa.string())), queries_path)
    return table.column("query_id")[index].as_py()


def first_requests(engine_dir: Path) -> dict[str, list[tuple[float, int]]]:
    """Query -> (time, replica pid) of each replica process that started its first stage."""
    seen: dict[str, dict[int, float]] = {}
    for f in engine_dir.glob("requests-*.log"):
        for line in f.read_text().splitlines():
            t, pid, q = line.split()
            seen.setdefault(q, {}).setdefault(int(pid), float(t))
    return {q: sorted((t, pid) for pid, t in by_pid.items()) for q, by_pid in seen.items()}


def part_times(parts: Path) -> dict[str, float]:
    """Query -> when its part was written (the part file's time)."""
    import pyarrow.parquet as pq

    when = {}
    for f in parts.glob("part-*.parquet"):
        mtime = f.stat().st_mtime
        for q in pq.read_table(f, columns=["query_id"]).column("query_id").to_pylist():
            when[q] = mtime
    return when


def lost_by_event(starts: dict[str, list[tuple[float, int]]], events: list[dict], parts: Path) -> list[set[str]]:
    """Per kill: the queries in flight on the killed units (started there, not yet in a part)."""
    written = part_times(parts) if parts.is_dir() else {}
    lost = []
    for e in events:
        pids = set(e["pids"]) if e["what"] != "driver" else None  # the driver takes every replica's work
        lost.append(
            {
                q
                for q, tries in starts.items()
                if any(t <= e["t"] and (pids is None or pid in pids) for t, pid in tries)
                and written.get(q, float("inf")) > e["t"]
            }
        )
    return lost


def redone_and_lost(engine_dir: Path, events: list[dict], parts: Path, poison: str) -> tuple[set[str], list[set[str]]]:
    """The queries started by more than one replica process (redone work; the poison query's tries
    aside), and per kill the queries in flight on the killed units."""
    starts = first_requests(engine_dir)
    redone = {q for q, tries in starts.items() if len(tries) > 1 and q != poison}
    return redone, lost_by_event(starts, events, parts)


def paper_batch_size() -> int:
    from utilrag.config import load_config

    cfg = load_config(PAPER_CONFIG)
    assert cfg.annotate is not None
    return cfg.annotate.scale.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="4,000 queries (<= 5 min)")
    size.add_argument("--capped", action="store_true", help="the make-test case: 768 queries (<= 90 s)")
    parser.add_argument("--queries", type=int, default=None, help="default 20,000 (the full run)")
    parser.add_argument("--F", type=float, default=60.0, help="time compression (default 60)")
    parser.add_argument("--autoscaler", choices=["v1", "v2"], default="v2", help="default v2 (as `ray up`)")
    parser.add_argument(
        "--package", default=None, help="run another checkout's utilrag package (a negative control), e.g. /tmp/old/pkg"
    )
    parser.add_argument("--out", default=None, help="the JSON's path (default benchmarks/results/rehearsal*.json)")
    args = parser.parse_args()
    if args.driver:
        driver(args.driver)
        return
    if args.package:
        os.environ["UTILRAG_REHEARSAL_PACKAGE"] = str(Path(args.package).resolve())
        sys.path.insert(0, os.environ["UTILRAG_REHEARSAL_PACKAGE"])
    queries = args.queries or (4000 if args.quick else 768 if args.capped else 20000)
    with tempfile.TemporaryDirectory(prefix="rehearsal-", dir="/tmp") as tmp:
        result = rehearse(queries, args.F, Path(tmp), v2=args.autoscaler == "v2")
        if not result["completed"]:
            print((Path(tmp) / "driver.log").read_text()[-4000:], file=sys.stderr)
    name = "rehearsal" + ("-quick" if args.quick else "-capped" if args.capped else "")
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{name}.json"
    if not args.capped or args.out:
        path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
