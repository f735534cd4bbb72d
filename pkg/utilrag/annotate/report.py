"""The agreement report: LLM labels against the human ones (the paper's Table 1, on our data)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

LLM_SOURCES = ["relsel", "utilsel", "utilrank", "graded", "qametric"]
POSITION_BUCKETS = ((1, 1), (2, 5), (6, 10), (11, 20), (21, 10**6))


def cohen_kappa(a: list[int], b: list[int], categories: list[int], weights: str | None = None) -> float | None:
    """Cohen's kappa of two raters over the same items; ``weights="linear"`` for ordinal grades."""
    if not a:
        return None
    index = {c: i for i, c in enumerate(categories)}
    k = len(categories)
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[index[x], index[y]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    if weights == "linear":
        i, j = np.indices((k, k))
        w = np.abs(i - j) / (k - 1)
    else:
        w = 1.0 - np.eye(k)
    denominator = (w * expected).sum()
    if denominator == 0:
        return None
    return float(1.0 - (w * observed).sum() / denominator)


class ReportTally:
    """The report's counts, added up one labels part at a time (queries never span parts), so the
    driver holds counters, not the labels table."""

    def __init__(self) -> None:
        # source -> queries, chosen, correct, relevant, queries_without_positive
        self.sources: dict[str, Counter] = defaultdict(Counter)
        self.positions: dict[tuple[str, tuple[int, int]], Counter] = defaultdict(Counter)  # human_positives, hits
        self.grade_pairs: Counter = Counter()  # (qrels grade, judge grade) -> pairs

    def add(self, labels: pa.Table, shown: dict[tuple[str, str], int] | None = None) -> None:
        cols = {c: labels.column(c).to_pylist() for c in ["query_id", "doc_id", "source", "positive", "grade"]}
        positives: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        labelled: dict[str, set[str]] = defaultdict(set)
        pairs: dict[str, set[tuple[str, str]]] = defaultdict(set)
        grades: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
        for q, d, source, positive, grade in zip(*cols.values()):
            labelled[source].add(q)
            pairs[source].add((q, d))
            if positive:
                positives[source][q].add(d)
            if grade is not None:
                grades[source][(q, d)] = grade
        human = positives["human"]
        for source in (s for s in LLM_SOURCES if s in labelled):
            tally = self.sources[source]
            for q in labelled[source]:
                tally["queries"] += 1
                tally["chosen"] += len(positives[source][q])
                tally["correct"] += len(positives[source][q] & human[q])
                tally["relevant"] += len(human[q])
                tally["queries_without_positive"] += not positives[source][q]
            if shown is None:
                continue
            human_pairs = {(q, d) for q, docs in human.items() for d in docs} & pairs[source]
            for low, high in POSITION_BUCKETS:
                here = [k for k in human_pairs if low <= shown.get(k, 0) <= high]
                if here:
                    bucket = self.positions[(source, (low, high))]
                    bucket["human_positives"] += len(here)
                    bucket["hits"] += sum(k[1] in positives[source][k[0]] for k in here)
        for key in set(grades["human"]) & set(grades["graded"]):
            self.grade_pairs[(grades["human"][key], grades["graded"][key])] += 1

    def agreement(self, summaries: dict[str, dict]) -> list[dict]:
        rows = []
        for source in (s for s in LLM_SOURCES if s in self.sources):
            t = self.sources[source]
            summary = summaries.get(source, {})
            rows.append(
                {
                    "source": source,
                    "queries": t["queries"],
                    "precision": round(t["correct"] / t["chosen"], 4) if t["chosen"] else None,
                    "recall": round(t["correct"] / t["relevant"], 4) if t["relevant"] else None,
                    "positives_per_query": round(t["chosen"] / t["queries"], 2) if t["queries"] else 0.0,
                    "queries_without_positive": t["queries_without_positive"],
                    "parse_failure_rate": summary.get("parse_failure_rate"),
                    "prompt_tokens_per_query": summary.get("prompt_tokens_per_query"),
                    "prefix_cache_hit_rate": summary.get("prefix_cache_hit_rate"),
                }
            )
        return rows

    def by_position(self) -> list[dict]:
        rows = []
        for source in LLM_SOURCES:
            for low, high in POSITION_BUCKETS:
                bucket = self.positions.get((source, (low, high)))
                if not bucket:
                    continue
                rows.append(
                    {
                        "source": source,
                        "shown_at": str(low) if low == high else (f"{low}-{high}" if high < 10**6 else f"{low}+"),
                        "human_positives": bucket["human_positives"],
                        "recall": round(bucket["hits"] / bucket["human_positives"], 4),
                    }
                )
        return rows

    def kappa(self) -> dict | None:
        """The judge's 0-3 grades against the qrels grades, on pool passages that have both."""
        if not self.grade_pairs:
            return None
        a = [x for (x, _), n in sorted(self.grade_pairs.items()) for _ in range(n)]
        b = [y for (_, y), n in sorted(self.grade_pairs.items()) for _ in range(n)]
        categories = sorted(set(a) | set(b) | {0, 1, 2, 3})
        return {
            "pairs": len(a),
            "kappa": _round(cohen_kappa(a, b, categories)),
            "kappa_linear": _round(cohen_kappa(a, b, categories, "linear")),
            "exact_agreement": round(sum(x == y for x, y in zip(a, b)) / len(a), 4),
        }


def _tally(labels: pa.Table, shown: dict[tuple[str, str], int] | None = None) -> ReportTally:
    tally = ReportTally()
    tally.add(labels, shown)
    return tally


def agreement(labels: pa.Table, summaries: dict[str, dict]) -> list[dict]:
    """Per LLM source: precision / recall of its positives against the human positives (micro,
    over the queries the source labelled), positives per query, parse failures, tokens."""
    return _tally(labels).agreement(summaries)


def agreement_by_position(labels: pa.Table, shown: dict[tuple[str, str], int]) -> list[dict]:
    """Recall of the human positives by the position [n] they were shown at in their RelSel window
    (``shown``: (query, doc) -> n): an annotator biased to the first passages selects them more often
    there. Only human positives the source labelled count (under Exclusion it labels none)."""
    return _tally(labels, shown).by_position()


def graded_kappa(labels: pa.Table) -> dict | None:
    """The judge's 0-3 grades against the qrels grades, on pool passages that have both."""
    return _tally(labels).kappa()


def _round(x):
    return None if x is None else round(x, 4)


def _fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{x:.1%}" if pct else (f"{x:,.2f}" if isinstance(x, float) else f"{x:,}")


def render_markdown(
    label: str, rows: list[dict], kappa: dict | None, model: str, by_position: list[dict] | None = None
) -> str:
    lines = [
        f"Agreement with human labels: {label} ({model})",
        "",
        "| stage | queries | precision | recall | positives/query | no positive | parse failures "
        "| prompt tokens/query | prefix-cache hits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['queries']} | {_fmt(r['precision'], True)} | {_fmt(r['recall'], True)} | "
            f"{_fmt(r['positives_per_query'])} | {r['queries_without_positive']} | "
            f"{_fmt(r['parse_failure_rate'], True)} | {_fmt(r['prompt_tokens_per_query'])} | "
            f"{_fmt(r['prefix_cache_hit_rate'], True)} |"
        )
    if by_position:
        lines += [
            "",
            "Recall of the human positives by the position [n] they were shown at in their RelSel window "
            "(pools are shuffled per query):",
            "",
            "| stage | shown at | human positives | recall |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['source']} | {r['shown_at']} | {r['human_positives']} | {_fmt(r['recall'], True)} |"
            for r in by_position
        ]
    if kappa:
        lines += [
            "",
            f"Graded judge vs qrels grades: Cohen's kappa {kappa['kappa']}, linear-weighted "
            f"{kappa['kappa_linear']}, exact agreement {kappa['exact_agreement']:.1%} over "
            f"{kappa['pairs']} judged pool passages",
        ]
    return "\n".join(lines)


def write_report(
    folder: Path,
    label: str,
    labels: pa.Table | ReportTally,
    summaries: dict[str, dict],
    model: str,
    shown: dict[tuple[str, str], int] | None = None,
) -> str:
    """The report files, from a labels table (and shown positions) or a tally already added up."""
    tally = labels if isinstance(labels, ReportTally) else _tally(labels, shown or None)
    rows = tally.agreement(summaries)
    kappa = tally.kappa()
    by_position = tally.by_position()
    text = render_markdown(label, rows, kappa, model, by_position)
    folder = Path(folder)
    (folder / "report.md").write_text(text + "\n")
    report = {
        "agreement": rows,
        "agreement_by_shown_position": by_position,
        "graded_kappa": kappa,
        "stages": summaries,
        "model": model,
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if rows:
        _plot(folder / "agreement.png", label, rows)
    return text


def _plot(path: Path, label: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["source"] for r in rows]
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for offset, key in [(-0.2, "precision"), (0.2, "recall")]:
        left.bar(x + offset, [r[key] or 0 for r in rows], width=0.4, label=key)
    left.set_xticks(x, names)
    left.set_ylim(0, 1)
    left.set_title("against human positives")
    left.legend()
    right.bar(x, [r["positives_per_query"] for r in rows], color="gray")
    right.set_xticks(x, names)
    right.set_title("positives per query")
    fig.suptitle(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
