"""Annotation data plane at MS MARCO shape, with a STAND-IN engine (no LLM): does the driver's memory
stay flat as the number of queries grows?

    python benchmarks/annotate_scale.py [--quick | --full] [--sizes 10000 50000]

Per size (the data made by one process, the job run by another, so the peak RSS is the job's own): synthetic pools
(31 passages of 56 words per query, a corpus of 18 docs per query, one human positive per query),
then the real streaming job of utilrag.annotate.job (inputs -> chain of four stages per block ->
stage tables, labels, rejects, report counts) with the engine replaced by ``StandInEngine``, which
answers every request at once with a fixed valid output (a stand-in, not an LLM: it measures the data
plane only; it lives here, in benchmarks/, never in the package).

Figures (last line, one JSON object): per size driver_peak_rss_mib, wall_s, data-plane requests/s,
object-store spill; driver_rss_ratio = peak RSS at the largest / the smallest size (goal <= 1.2, and
under 2 GiB); resume_plan: a rerun's driver bookkeeping with 90% of the queries done (491,007 queries
unless --quick), its RSS growth and the finished ids it keeps. --quick: 2,000 and 10,000 queries
(about 5 minutes on 2 cores); default 10,000 and 50,000; --full: 10,000 and 491,007.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pkg"))

WORDS = (
    "protein cell gene virus immune cancer brain heart blood drug trial dose risk age diet sleep stress "
    "lung liver bone muscle skin kidney vaccine insulin obesity river mountain city market price"
).split()
POOL, DOCS_PER_QUERY, PASSAGE_WORDS = 31, 18, 56


class StandInEngine:
    """A STAND-IN for VLLMEngine (benchmark only): every request answered at once with a fixed valid
    output for its stage; prompt tokens counted as characters / 4."""

    OUTPUTS = {
        "You are the relevance judger": "My selection:[[1],[3],[5]].",
        "You are a faithful question": "A stand-in answer.",
        "You are the utility judger": "My selection:[[1]].",
        "You are RankGPT": "[2] > [1] > [3]",
    }

    def __init__(self, model: str, engine: dict):
        self.error = None
        self.starts = 1
        self.ready_at = time.time()
        self.busy_s = 0.0

    def sampling_params(self, sampling: dict) -> dict:
        return sampling

    def check(self) -> None:
        return None

    def generate(self, messages: list, sampling: list) -> dict:
        t0 = time.time()
        raw = []
        for chat in messages:
            first = chat[0]["content"]
            raw.append(next((v for k, v in self.OUTPUTS.items() if first.startswith(k)), "##final score: 2"))
        out = {
            "raw_output": raw,
            "prompt_tokens": [sum(len(m["content"]) for m in chat) // 4 for chat in messages],
            "output_tokens": [len(r) // 4 for r in raw],
            "cached_tokens": [0] * len(raw),
            "finish_reason": ["stop"] * len(raw),
        }
        self.busy_s += time.time() - t0
        return out

    async def generate_one(self, chat: list, sampling: dict) -> dict:
        """The async engine's call (engine.async_engine: true), one request."""
        return {k: v[0] for k, v in self.generate([chat], [sampling]).items()}


def synthetic(folder: Path, queries: int, seed: int = 0, ids_in_text: bool = False) -> dict[str, str]:
    """pools / queries / corpus Parquet files at MS MARCO shape, written in slices (bounded memory);
    ``ids_in_text``: each query's text starts with its id (the rehearsal's stand-in logs it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = queries * DOCS_PER_QUERY
    paths = {name: str(folder / f"{name}.parquet") for name in ("pools", "queries", "corpus")}
    corpus_schema = pa.schema([("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(paths["corpus"], corpus_schema) as writer:
        for start in range(0, docs, 50_000):
            ids = range(start, min(docs, start + 50_000))
            writer.write_table(
                pa.table(
                    {
                        "doc_id": [f"d{i}" for i in ids],
                        "title": [""] * len(ids),
                        "text": [" ".join(rng.choices(WORDS, k=PASSAGE_WORDS)) for _ in ids],
                    },
                    schema=corpus_schema,
                )
            )
    pools_schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("position", pa.int32()),
            ("source", pa.string()),
            ("human_grade", pa.int32()),
        ]
    )
    with (
        pq.ParquetWriter(paths["pools"], pools_schema) as pools,
        pq.ParquetWriter(paths["queries"], pa.schema([("query_id", pa.string()), ("text", pa.string())])) as texts,
    ):
        for start in range(0, queries, 10_000):
            rows: dict[str, list] = {name: [] for name in pools_schema.names}
            qids = [f"q{i}" for i in range(start, min(queries, start + 10_000))]
            for q in qids:
                pool = rng.sample(range(docs), POOL)
                for position, d in enumerate(pool):
                    rows["query_id"].append(q)
                    rows["doc_id"].append(f"d{d}")
                    rows["position"].append(position)
                    rows["source"].append("human" if position == 0 else "bm25")
                    rows["human_grade"].append(1 if position == 0 else None)
            pools.write_table(pa.table(rows, schema=pools_schema))
            words = [" ".join(rng.choices(WORDS, k=6)) for _ in qids]
            text = [f"{q} {w}" for q, w in zip(qids, words)] if ids_in_text else words
            texts.write_table(pa.table({"query_id": qids, "text": text}))
    return paths


class PeakRSS:
    """The driver's peak resident memory, sampled (ru_maxrss as a floor)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def spilled_mib() -> float:
    """Object-store bytes spilled to disk so far (Ray's memory summary)."""
    try:
        from ray._private.internal_api import memory_summary

        for line in memory_summary(stats_only=True).splitlines():
            if line.strip().startswith("Spilled"):
                return float(line.split()[1])
    except Exception:  # noqa: BLE001 -- a figure, not a failure
        pass
    return 0.0


def one_size(queries: int, work: Path, batch_size: int) -> dict:
    """One size in this process: synthetic data, then the streaming job with the stand-in."""
    import ray

    from utilrag.annotate import job
    from utilrag.config import AnnotateConfig
    from utilrag.raycluster import quiet_ray_data

    folder = work / "data"
    paths = {name: str(folder / f"{name}.parquet") for name in ("pools", "queries", "corpus")}
    acfg = AnnotateConfig(
        model="stand-in",
        passage_words=300,
        stages=["relsel", "answer", "utilsel", "utilrank"],
        scale={"batch_size": batch_size, "replicas": (1, 1), "progress_every_s": 30},
        engine={"cpus_per_replica": 1},
    )
    out = str(work / "out")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    quiet_ray_data()
    with PeakRSS() as rss:
        t1 = time.time()
        job.ensure_inputs(out, "bench", paths, acfg, None, "bench")
        prepare_s = time.time() - t1
        t2 = time.time()
        stats = job.run_chain(out, "bench", acfg, "stand-in", "bench", None, "run", StandInEngine)
        chain_s = time.time() - t2
        t3 = time.time()
        annotated, rejects, _ = job.write_rejects(str(Path(out) / "inputs"), str(Path(out) / "rejects.parquet"))
        tallies, _, label_rows, _ = job.finalize(
            out, str(Path(out) / "labels.parquet"), str(Path(out) / "errors.parquet"), acfg, "run"
        )
        finalize_s = time.time() - t3
    requests = sum(t.counts["rows"] for t in tallies.values())
    spill = spilled_mib()
    ray.shutdown()
    return {
        "queries": queries,
        "annotated": annotated,
        "rejects": rejects,
        "requests": requests,
        "label_rows": label_rows,
        "driver_peak_rss_mib": round(rss.peak / 2**20, 1),
        "prepare_s": round(prepare_s, 1),
        "chain_s": round(chain_s, 1),
        "finalize_s": round(finalize_s, 1),
        "requests_per_s": round(requests / chain_s, 1),
        "object_store_spilled_mib": spill,
        **job.replica_figures(stats),
    }


def resume_probe(queries: int, work: Path, per_file: int = 1000, block: int = 256) -> dict:
    """The rerun's driver-side bookkeeping at ``queries``, without Ray: 90% of the queries done in
    parts of ``block`` queries; resume_plan reads their (query_id, part) file by file and keeps only
    the ids inside partly finished input files. Reports its RSS growth and what it keeps."""
    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq

    from utilrag.annotate.chain import CHAIN_SCHEMA
    from utilrag.annotate.job import resume_plan
    from utilrag.annotate.prepare import INPUT_SCHEMA

    inputs, parts = work / "inputs", work / "chain.parts"
    inputs.mkdir(parents=True)
    parts.mkdir()

    def table(schema, columns: dict) -> pa.Table:
        n = len(next(iter(columns.values())))
        return pa.table({k: columns.get(k, [None] * n) for k in schema.names}, schema=schema)

    for j, start in enumerate(range(0, queries, per_file)):
        ids = [f"q{i}" for i in range(start, min(queries, start + per_file))]
        pq.write_table(
            table(INPUT_SCHEMA, {"query_id": ids, "part": [j] * len(ids), "annotate": [True] * len(ids)}),
            inputs / f"part-{j:05d}.parquet",
        )
    done = int(queries * 0.9)
    for start in range(0, done, block):
        numbers = range(start, min(done, start + block))
        columns = {"query_id": [f"q{i}" for i in numbers], "part": [i // per_file for i in numbers]}
        pq.write_table(table(CHAIN_SCHEMA, columns), parts / f"part-{start:09d}.parquet")
    process = psutil.Process()
    before = process.memory_info().rss
    t0 = time.time()
    files, kept, expected, n_done, read_bytes = resume_plan(str(inputs), str(parts))
    return {
        "queries": queries,
        "done": n_done,
        "input_files_to_read": len(files),
        "done_ids_read_mib": round(read_bytes / 2**20, 2),
        "done_ids_kept": len(kept),
        "driver_rss_growth_mib": round((process.memory_info().rss - before) / 2**20, 1),
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="2,000 and 10,000 queries (about 5 minutes here)")
    group.add_argument("--full", action="store_true", help="10,000 and 491,007 queries (MS MARCO train)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=256, help="queries per replica call")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one size
    parser.add_argument("--make", type=int, default=None, help=argparse.SUPPRESS)  # a child: the data
    parser.add_argument("--resume", type=int, default=None, help=argparse.SUPPRESS)  # a child: the resume probe
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, Path(args.work), args.batch_size)))
        return
    if args.make is not None:  # its own process: the job's driver peak is not the generator's
        synthetic(Path(args.work) / "data", args.make)
        return
    if args.resume is not None:
        print(json.dumps(resume_probe(args.resume, Path(args.work))))
        return
    sizes = args.sizes or ([2_000, 10_000] if args.quick else [10_000, 491_007] if args.full else [10_000, 50_000])
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"annotate-scale-{n}-") as work:
            env = {**os.environ, "PYTHONPATH": str(ROOT / "pkg"), "RAY_ADDRESS": ""}
            make = subprocess.run([sys.executable, __file__, "--make", str(n), "--work", work], env=env)
            if make.returncode != 0:
                raise SystemExit(f"size {n}: the synthetic data failed")
            command = [sys.executable, __file__, "--one", str(n), "--work", work, "--batch-size", str(args.batch_size)]
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"size {n} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[bench] {n:,} queries: {json.dumps(result)}", flush=True)
            results.append(result)
    with tempfile.TemporaryDirectory(prefix="annotate-resume-") as work:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "pkg")}
        probe_size = 491_007 if args.full or not args.quick else sizes[-1]
        command = [sys.executable, __file__, "--resume", str(probe_size), "--work", work]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the resume probe failed:\n{proc.stderr[-3000:]}")
        resume = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[bench] resume plan: {json.dumps(resume)}", flush=True)
    small, large = results[0], results[-1]
    ratio = large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"]
    print(
        json.dumps(
            {
                "engine": "stand-in (fixed valid outputs; data plane only)",
                "sizes": results,
                "driver_rss_ratio": round(ratio, 3),
                "driver_rss_ratio_sizes": [small["queries"], large["queries"]],
                "goal_driver_rss_ratio_le_1_2": ratio <= 1.2,
                "goal_driver_rss_under_2_gib": max(r["driver_peak_rss_mib"] for r in results) < 2048,
                "resume_plan": resume,
            }
        )
    )


if __name__ == "__main__":
    main()
