"""The LLM judge where real qrels exist: SciFact test, its queries supplied and its qrels held back.

    python benchmarks/judge_scifact.py [--queries 300] [--depth 5] [--model NAME] [--quick]

``utilrag run`` (its own process, local Ray) on jobs/configs/scifact-judged.yaml: SciFact ingested,
BM25 and the untuned MiniLM search the test queries, the judge grades the union of their top
``depth`` passages for ``queries`` test queries, and the evaluate stage scores both runs on the real
and on the judged qrels. The judge never sees the qrels: they are read only to compare. Printed: the
nDCG@10 of each run on both (over the same judged queries), whether the two qrels order the runs
alike, and the judge's kappa and confusion against the qrels. With SmolLM2-135M (the default here) the
figures test the method's plumbing at this scale, not a judge worth trusting. ``--quick``: 30 queries,
depth 3. Last line: one JSON object (also written to benchmarks/results/judge_scifact[-quick].json).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=300, help="judged test queries (SciFact test has 300)")
    ap.add_argument("--depth", type=int, default=5, help="each run's top-k judged")
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="the judge")
    ap.add_argument("--output-dir", default=str(ROOT / "outputs" / "judge-scifact"))
    ap.add_argument("--quick", action="store_true", help="30 queries, depth 3")
    args = ap.parse_args()
    if args.quick:
        args.queries, args.depth = 30, 3
    out = Path(args.output_dir) / f"q{args.queries}-d{args.depth}"
    overrides = [
        f"output_dir={out}",
        f"judge.model={args.model}",
        f"judge.depth={args.depth}",
        f"judge.targets.0.max_queries={args.queries}",
    ]
    t0 = time.time()
    cmd = [sys.executable, "-m", "utilrag.cli", "run", "--config", str(ROOT / "jobs/configs/scifact-judged.yaml")]
    subprocess.run([*cmd, *overrides], check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - t0
    result = figures(out)
    result.update(
        {
            "benchmark": "judge_scifact",
            "judge": args.model,
            "queries": args.queries,
            "depth": args.depth,
            "wall_s": round(wall, 1),
            "machine": "2 CPU cores (vLLM-CPU, bf16), no GPU",
        }
    )
    name = "judge_scifact-quick.json" if args.quick else "judge_scifact.json"
    (ROOT / "benchmarks" / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def figures(out: Path) -> dict:
    import pyarrow.parquet as pq

    from utilrag.store import read_manifest

    judge = read_manifest(out / "judge" / "scifact-test" / "qrels")
    rows = pq.read_table(out / "evaluate" / "per_query.parquet").to_pylist()
    judged = "scifact (LLM-judged)"
    on_judged = {r["query_id"] for r in rows if r["dataset"] == judged}
    ndcg: dict[str, dict[str, float]] = {}
    for qrels in ("scifact", judged):
        for label in ("bm25s", "minilm"):
            values = [
                r["value"]
                for r in rows
                if r["dataset"] == qrels
                and r["label"] == label
                and r["metric"] == "nDCG@10"
                and r["query_id"] in on_judged
            ]
            ndcg.setdefault("real qrels" if qrels == "scifact" else "LLM-judged", {})[label] = round(
                sum(values) / len(values), 4
            )
    real, llm = ndcg["real qrels"], ndcg["LLM-judged"]
    agreement = judge["agreement"]
    return {
        "ndcg@10_on_judged_queries": ndcg,
        "same_order": (real["bm25s"] > real["minilm"]) == (llm["bm25s"] > llm["minilm"]),
        "judged_queries": len(on_judged),
        "judged_passages": judge["rows"]["pairs"],
        "unparsed": judge["rows"]["unparsed"],
        "judge_relevant": agreement["judge_relevant"],
        "qrels_relevant": agreement["qrels_relevant"],
        "kappa": agreement["kappa"],
        "graded_kappa": agreement["graded_kappa"],
        "rule": agreement["rule"],
        "confusion": agreement["confusion"],
        "judge_wall_s": judge.get("wall_time_s"),
    }


if __name__ == "__main__":
    main()
