"""Paired significance tests of per-query metric values against a baseline run (scipy)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def paired_tests(
    baseline: dict[str, float], other: dict[str, float], permutations: int = 10_000, seed: int = 0
) -> dict:
    """Two-sided paired t-test and paired randomisation (sign-flip) test over the shared queries."""
    queries = sorted(set(baseline) & set(other))
    a = np.array([baseline[q] for q in queries])
    b = np.array([other[q] for q in queries])
    diff = b - a
    if len(queries) < 2 or np.allclose(diff, 0):
        return {"queries": len(queries), "delta": float(diff.mean()) if len(diff) else 0.0, "t_p": 1.0, "rand_p": 1.0}
    t_p = float(stats.ttest_rel(b, a).pvalue)
    rand = stats.permutation_test(
        (b, a),
        lambda x, y: np.mean(x - y),
        permutation_type="samples",
        vectorized=False,
        n_resamples=permutations,
        alternative="two-sided",
        random_state=seed,
    )
    return {"queries": len(queries), "delta": float(diff.mean()), "t_p": t_p, "rand_p": float(rand.pvalue)}


def format_paired_tests(
    tests: list[dict], baseline: str, columns: list[tuple[str, str]], delta_scale: float = 1.0
) -> str:
    """A Markdown table of paired tests: the identifying ``columns`` (header, key), then Δ (scaled;
    * when both tests give p < 0.05) and both p values."""
    lines = [
        f"Paired tests against {baseline!r} (two-sided; * p < 0.05 in both):",
        "",
        "| " + " | ".join(h for h, _ in columns) + " | Δ | t-test p | randomisation p |",
        "|" + "---|" * len(columns) + "---:|---:|---:|",
    ]
    decimals = 4 if delta_scale == 1.0 else 1
    for t in tests:
        star = " *" if max(t["t_p"], t["rand_p"]) < 0.05 else ""
        cells = [str(t[key]) for _, key in columns]
        delta = f"{delta_scale * t['delta']:+.{decimals}f}{star}"
        lines.append("| " + " | ".join(cells) + f" | {delta} | {t['t_p']:.4f} | {t['rand_p']:.4f} |")
    return "\n".join(lines)
