"""The run-to-run spread of the label settings: the evaluate stage's table of a run whose settings were
trained with several seeds (``<name>``, ``<name>-s1``, ``<name>-s2`` …, as jobs/configs/seeds-local.yaml),
per setting the mean, standard deviation and range over seeds, and each setting's difference from the
baseline setting: of the means, and seed by seed (same seed, same data order) with its spread.

    python scripts/seed_spread.py outputs/seeds-local [--baseline human] [--out FILE]

Prints a Markdown table; the last line is one JSON object (also written to --out)."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SEED_SUFFIX = re.compile(r"^(?P<name>.+?)(?:-s(?P<seed>\d+))?$")


def spread(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output_dir", help="the run's output_dir (its evaluate/metrics.json is read)")
    ap.add_argument("--baseline", default="human", help="the setting every other is compared with")
    ap.add_argument("--metrics", default="nDCG@10,MRR@10,R@100", help="comma-separated metrics")
    ap.add_argument("--out", default=None, help="the JSON file (default: print only)")
    args = ap.parse_args()
    table = Path(args.output_dir) / "evaluate" / "metrics.json"
    if not table.is_file():
        print(f"seed_spread: {table}: not found (run the config's evaluate stage first)", file=sys.stderr)
        raise SystemExit(2)
    metrics = args.metrics.split(",")
    rows = [r for r in json.loads(table.read_text()) if r.get("label") and r.get("queries")]
    datasets = sorted({r["dataset"] for r in rows})
    if len(datasets) > 1:
        rows = [r for r in rows if r["dataset"] == datasets[0]]  # one table: the first dataset's rows
    by_setting: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        m = SEED_SUFFIX.match(r["label"])
        assert m is not None
        by_setting[m["name"]][int(m["seed"] or 0)] = r
    seeded = {name: runs for name, runs in by_setting.items() if len(runs) > 1}
    if args.baseline not in seeded:
        print(f"seed_spread: no setting {args.baseline!r} with several seeds in {table}", file=sys.stderr)
        raise SystemExit(2)
    base = seeded[args.baseline]
    result: dict = {"table": str(table), "baseline": args.baseline, "settings": {}}
    for name, runs in seeded.items():
        entry: dict = {"seeds": sorted(runs)}
        for metric in metrics:
            values = [runs[s][metric] for s in sorted(runs)]
            entry[metric] = spread(values)
            paired = [runs[s][metric] - base[s][metric] for s in sorted(runs) if s in base]
            if name != args.baseline and paired:
                entry[f"{metric} - {args.baseline}"] = spread(paired)
        result["settings"][name] = entry
    metric = metrics[0]
    print(f"| setting | seeds | {metric} mean | sd | range | minus {args.baseline}, seed by seed (mean ± sd) |")
    print("|---|---:|---:|---:|---|---|")
    for name, entry in result["settings"].items():
        s = entry[metric]
        diff = entry.get(f"{metric} - {args.baseline}")
        shown = f"{diff['mean']:+.4f} ± {diff['sd']:.4f}" if diff and diff["sd"] is not None else ""
        print(f"| {name} | {s['n']} | {s['mean']:.4f} | {s['sd']:.4f} | {s['min']:.4f}–{s['max']:.4f} | {shown} |")
    sds = [e[metric]["sd"] for e in result["settings"].values() if e[metric]["sd"] is not None]
    diffs = [
        abs(d[f"{metric} - {args.baseline}"]["mean"])
        for d in result["settings"].values()
        if f"{metric} - {args.baseline}" in d
    ]
    result["dataset"] = datasets[0] if datasets else None
    result["largest_seed_sd"] = max(sds, default=None)
    result["largest_setting_difference"] = max(diffs, default=None)
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    main()
