"""Training's driver memory at MS MARCO shape: is the driver's peak RSS flat as the queries grow?

    python benchmarks/train_driver_rss.py [--quick] [--sizes 10000 100000]

Per size: a synthetic MS MARCO-layout dataset (collection.tsv with 18 passages of 30 words per query,
queries.train.tsv, one human positive per query in qrels.train.tsv, and a run of 31 candidates per
query in runs/synth.trec), ingested and pooled by `utilrag pipeline --only ingest pools` (one process),
then `utilrag train` (another process, whose resident memory is sampled every 0.1 s): the training
data built on a worker (train/dataset.py build_on_a_worker), then 2 steps of MiniLM on one worker.
The figure is the train driver's peak RSS; the ratio largest / smallest size is the goal (<= 1.2):
the driver holds no per-query or per-passage data (the pools, the texts and the groups stay in the
build task on a CPU node, and the workers read their files from the run directory).

Last line, one JSON object (also benchmarks/results/train_driver_rss[-quick].json). --quick: 2,000
and 20,000 queries (about 3 minutes on 2 cores); default 10,000 and 100,000 (about 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "protein cell gene virus immune cancer brain heart blood drug trial dose risk age diet sleep stress "
    "lung liver bone muscle skin kidney vaccine insulin obesity river mountain city market price"
).split()
POOL, DOCS_PER_QUERY, PASSAGE_WORDS = 31, 18, 30


def synthetic(folder: Path, queries: int, seed: int = 0) -> int:
    """The MS MARCO-layout files, written in slices; returns the number of passages."""
    rng = random.Random(seed)
    docs = queries * DOCS_PER_QUERY
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    with open(folder / "collection.tsv", "w") as f:
        for start in range(0, docs, 50_000):
            f.write(
                "".join(
                    f"{i}\t{' '.join(rng.choices(WORDS, k=PASSAGE_WORDS))}\n"
                    for i in range(start, min(docs, start + 50_000))
                )
            )
    with (
        open(folder / "queries.train.tsv", "w") as q,
        open(folder / "qrels.train.tsv", "w") as qrels,
        open(folder / "runs" / "synth.trec", "w") as run,
    ):
        for i in range(queries):
            positive = i * DOCS_PER_QUERY  # each query's own block of the corpus
            q.write(f"q{i}\t{' '.join(rng.choices(WORDS, k=6))}\n")
            qrels.write(f"q{i} 0 {positive} 1\n")
            candidates = [positive, *rng.sample(range(docs), POOL - 1)]
            run.write("".join(f"q{i} Q0 {d} {r + 1} {POOL - r} synth\n" for r, d in enumerate(candidates)))
    return docs


def cli(args: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """`utilrag ARGS` as a process of its own: (exit code, wall s, peak RSS MiB of that process alone)."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "utilrag.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        me, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, me.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
    return proc.returncode, time.time() - t0, peak / 2**20


def one_size(queries: int, work: Path) -> dict:
    data, out = work / "data", work / "out"
    t0 = time.time()
    passages = synthetic(data, queries)
    made_s = time.time() - t0
    config = work / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(out),
                "ray": {"num_cpus": 2},
                "ingest": {"datasets": [{"name": "synth", "path": str(data), "layout": "msmarco"}]},
                "pools": [{"dataset": "synth", "split": "train", "run": "synth", "size": POOL}],
                "train": {
                    "dataset": "synth",
                    "split": "train",
                    "group_size": 8,
                    "per_device_queries": 4,
                    "num_workers": 1,
                    "max_steps": 2,
                    "epochs": 1,
                    "query_max_len": 16,
                    "passage_max_len": 48,
                    "checkpoint_every": None,
                },
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "pkg"), "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    code, setup_s, _ = cli(["pipeline", "--only", "ingest", "pools", "--config", str(config)], env, work / "setup.log")
    if code != 0:
        raise SystemExit(f"ingest/pools failed ({code}): {(work / 'setup.log').read_text()[-3000:]}")
    code, train_s, peak = cli(["train", "--config", str(config)], env, work / "train.log")
    log = (work / "train.log").read_text()
    if code != 0:
        raise SystemExit(f"train failed ({code}): {log[-3000:]}")
    groups = [ln for ln in log.splitlines() if "groups of" in ln]
    return {
        "queries": queries,
        "passages": passages,
        "train_driver_peak_rss_mib": round(peak, 1),
        "train_wall_s": round(train_s, 1),
        "data_made_s": round(made_s, 1),
        "ingest_pools_s": round(setup_s, 1),
        "phase": groups[0].split("] ", 1)[-1] if groups else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 queries")
    parser.add_argument("--sizes", type=int, nargs="+", help="query counts (default 10,000 and 100,000)")
    args = parser.parse_args()
    sizes = args.sizes or ([2_000, 20_000] if args.quick else [10_000, 100_000])
    t0 = time.time()
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"train-rss-{n}-") as tmp:
            results.append(one_size(n, Path(tmp)))
        print(json.dumps(results[-1]), flush=True)
    small, large = results[0], results[-1]
    ratio = large["train_driver_peak_rss_mib"] / small["train_driver_peak_rss_mib"]
    summary = {
        "benchmark": "train_driver_rss",
        "sizes": results,
        "driver_rss_ratio": round(ratio, 3),
        "goal": "driver_rss_ratio <= 1.2",
        "ok": ratio <= 1.2,
        "wall_s": round(time.time() - t0, 1),
        "machine": f"{os.cpu_count()} CPUs, no GPU",
    }
    name = "train_driver_rss-quick.json" if args.quick else "train_driver_rss.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
