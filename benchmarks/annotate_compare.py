"""Old path vs new: the stage-by-stage annotation of a git ref (default ``main``) against this
checkout's streaming chain, on the same DL19 slice with the same model and greedy decoding.

    python benchmarks/annotate_compare.py [--ref main] [--queries 10] [--model PATH]

Both run ``utilrag annotate`` (each in its own process and local Ray) on one ingested, pooled DL19;
the old one with the ref's ``pkg/`` (``git archive``), the new one with this checkout's. Default
model: the tests' tiny random-weight Llama (no download); constrained decoding on, so the listwise
stages select something and the later stages have work. Compared: every stage table row by row
(sorted by query and window) and the labels (sorted by query, source, doc). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pkg"))
STAGES = ["relsel", "answer", "utilsel", "utilrank", "graded"]


def old_package(ref: str, folder: Path) -> Path:
    """The ref's pkg/ folder, extracted (git archive)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "pkg"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "pkg"


def config(path: Path, out: Path, model: str, queries: int, name: str, batch_size: int, max_tokens: int) -> Path:
    import yaml

    from utilrag.paths import REPO_ROOT

    section = {
        "model": model,
        "targets": [{"dataset": "trec-dl-2019", "split": "default", "max_queries": queries}],
        "stages": STAGES,
        "graded_queries": 3,
        "output_name": name,
        "passage_words": 20,
        "window": 31,  # one RelSel window: the tiny random model's favourite id, [22], is a valid choice
        "sampling": {"max_tokens": max_tokens, "answer_max_tokens": max_tokens, "constrained": True},
        "engine": {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "kv_cache_gib": 1},
        "scale": {"batch_size": batch_size, "progress_every_s": 30},
    }
    shared = REPO_ROOT.parent / "shared" / "datasets"
    path.write_text(
        yaml.safe_dump(
            {
                "data_root": str(shared),
                "output_dir": str(out),
                "ray": {"num_cpus": 2},
                "ingest": {"datasets": [{"name": "trec-dl-2019"}]},
                "pools": [{"dataset": "trec-dl-2019", "split": "default", "run": "bm25", "size": 31}],
                "annotate": section,
            }
        )
    )
    return path


def run(pkg: Path, config_path: Path, log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(pkg), "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "utilrag.cli", "annotate", "--config", str(config_path)],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if proc.returncode != 0:
        raise SystemExit(f"{pkg}: annotate failed; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
    return time.time() - t0


def compare(old, new, keys: list[str]) -> dict:
    """Row-by-row comparison of two tables sorted by ``keys``: rows, identical rows, columns that differ."""
    old_rows = old.sort_by([(k, "ascending") for k in keys]).to_pylist()
    new_rows = new.sort_by([(k, "ascending") for k in keys]).to_pylist()
    differing: dict[str, int] = {}
    for a, b in zip(old_rows, new_rows):
        for column in a:
            if a[column] != b.get(column):
                differing[column] = differing.get(column, 0) + 1
    same = sum(a == b for a, b in zip(old_rows, new_rows))
    return {"rows_old": len(old_rows), "rows_new": len(new_rows), "identical_rows": same, "differing": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="main", help="the old path's git ref")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--model", default=None, help="an HF folder; default: the tests' tiny random model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per request (every stage)")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from utilrag.annotate.tiny import make_tiny_llm
    from utilrag.config import load_config
    from utilrag.data import ingest, run_pools

    work = Path(tempfile.mkdtemp(prefix="annotate-compare-"))
    out = work / "out"
    model = args.model or str(make_tiny_llm(work / "tiny"))
    old_cfg = config(work / "old.yaml", out, model, args.queries, "old", args.batch_size, args.max_tokens)
    new_cfg = config(work / "new.yaml", out, model, args.queries, "new", args.batch_size, args.max_tokens)
    cfg = load_config(new_cfg)
    ingest(cfg)
    run_pools(cfg, cfg.pools[0])
    old_s = run(old_package(args.ref, work / "old"), old_cfg, work / "old.log")
    new_s = run(ROOT / "pkg", new_cfg, work / "new.log")
    folder = out / "annotate"
    result: dict = {"ref": args.ref, "queries": args.queries, "model": "tiny-random" if not args.model else model}
    for stage in STAGES:
        result[stage] = compare(
            pq.read_table(folder / "trec-dl-2019-default-old" / f"{stage}.parquet"),
            pq.read_table(folder / "trec-dl-2019-default-new" / f"{stage}.parquet"),
            ["query_id", "window"],
        )
    result["labels"] = compare(
        pq.read_table(folder / "trec-dl-2019-default-old" / "labels.parquet"),
        pq.read_table(folder / "trec-dl-2019-default-new" / "labels.parquet"),
        ["query_id", "source", "doc_id"],
    )
    result["identical"] = all(
        r["rows_old"] == r["rows_new"] == r["identical_rows"] for k, r in result.items() if isinstance(r, dict)
    )
    result["wall_s"] = {"old": round(old_s, 1), "new": round(new_s, 1)}
    print(f"[compare] logs: {work}/old.log {work}/new.log", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
