"""Retrieval metrics through ir_measures (pytrec_eval underneath), with the field's names.

Graded qrels: nDCG uses the grades as gains; the binary measures (MRR, Recall, MAP) count a
document relevant at grade >= threshold, as ``trec_eval -l <threshold>`` does (TREC DL: 2).
Queries in the qrels that a run does not answer score 0 (trec_eval ``-c``).
"""

from __future__ import annotations

from collections import defaultdict

import ir_measures
import pyarrow as pa

from utilrag.errors import UtilragError

DEFAULT_METRICS = ["nDCG@10", "MRR@10", "R@100", "R@1000", "MAP"]


class MetricError(UtilragError, ValueError):
    pass


def to_measure(name: str, threshold: int):
    """Our metric names -> ir_measures measures; other ir_measures names pass through."""
    base, _, cutoff = name.partition("@")
    at = f"@{cutoff}" if cutoff else ""
    rel = f"(rel={threshold})"
    aliases = {
        "nDCG": f"nDCG{at}",
        "MRR": f"RR{rel}{at}",
        "RR": f"RR{rel}{at}",
        "R": f"R{rel}{at}",
        "Recall": f"R{rel}{at}",
        "P": f"P{rel}{at}",
        "MAP": f"AP{rel}{at}",
        "AP": f"AP{rel}{at}",
    }
    text = aliases.get(base, name)
    try:
        return ir_measures.parse_measure(text)
    except (ValueError, NameError, SyntaxError) as e:
        raise MetricError(f"unknown metric {name!r} ({e})") from None


def evaluate(
    qrels: pa.Table, run: pa.Table, metrics: list[str] = DEFAULT_METRICS, threshold: int = 1
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query values of each metric (qrels/run as Arrow tables with our columns)."""
    measures = {m: to_measure(m, threshold) for m in metrics}
    qrels_list = [
        ir_measures.Qrel(q, d, int(g))
        for q, d, g in zip(*(qrels.column(c).to_pylist() for c in ["query_id", "doc_id", "grade"]))
    ]
    run_list = [
        ir_measures.ScoredDoc(q, d, float(s))
        for q, d, s in zip(*(run.column(c).to_pylist() for c in ["query_id", "doc_id", "score"]))
    ]
    by_measure = {v: k for k, v in measures.items()}
    per_query: dict[str, dict[str, float]] = defaultdict(dict)
    for m in ir_measures.iter_calc(list(measures.values()), qrels_list, run_list):
        per_query[m.query_id][by_measure[m.measure]] = float(m.value)
    for qid in {q.query_id for q in qrels_list}:
        for name in metrics:
            per_query[qid].setdefault(name, 0.0)  # unanswered query: 0, as trec_eval -c
    n = len(per_query)
    means = {name: (sum(v[name] for v in per_query.values()) / n if n else 0.0) for name in metrics}
    return means, dict(per_query)
