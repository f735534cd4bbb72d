"""The agreement report: LLM labels against the human ones (the paper's Table 1, on our data)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa

LLM_SOURCES = ["relsel", "utilsel", "utilrank", "graded"]


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


def agreement(labels: pa.Table, summaries: dict[str, dict]) -> list[dict]:
    """Per LLM source: precision / recall of its positives against the human positives (micro,
    over the queries the source labelled), positives per query, parse failures, tokens."""
    cols = {c: labels.column(c).to_pylist() for c in ["query_id", "doc_id", "source", "positive"]}
    positives: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    labelled: dict[str, set[str]] = defaultdict(set)
    for q, d, source, positive in zip(cols["query_id"], cols["doc_id"], cols["source"], cols["positive"]):
        labelled[source].add(q)
        if positive:
            positives[source][q].add(d)
    human = positives["human"]
    rows = []
    for source in LLM_SOURCES:
        if source not in labelled:
            continue
        queries = labelled[source]
        chosen = sum(len(positives[source][q]) for q in queries)
        correct = sum(len(positives[source][q] & human[q]) for q in queries)
        relevant = sum(len(human[q]) for q in queries)
        summary = summaries.get(source, {})
        rows.append(
            {
                "source": source,
                "queries": len(queries),
                "precision": round(correct / chosen, 4) if chosen else None,
                "recall": round(correct / relevant, 4) if relevant else None,
                "positives_per_query": round(chosen / len(queries), 2) if queries else 0.0,
                "queries_without_positive": sum(1 for q in queries if not positives[source][q]),
                "parse_failure_rate": summary.get("parse_failure_rate"),
                "prompt_tokens_per_query": summary.get("prompt_tokens_per_query"),
                "prefix_cache_hit_rate": summary.get("prefix_cache_hit_rate"),
            }
        )
    return rows


POSITION_BUCKETS = ((1, 1), (2, 5), (6, 10), (11, 20), (21, 10**6))


def agreement_by_position(labels: pa.Table, shown: dict[tuple[str, str], int]) -> list[dict]:
    """Recall of the human positives by the position [n] they were shown at in their RelSel window
    (``shown``: (query, doc) -> n): an annotator biased to the first passages selects them more often
    there. Only human positives the source labelled count (under Exclusion it labels none)."""
    cols = {c: labels.column(c).to_pylist() for c in ["query_id", "doc_id", "source", "positive"]}
    human: set[tuple[str, str]] = set()
    chosen: dict[str, set[tuple[str, str]]] = defaultdict(set)
    labelled: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for q, d, source, positive in zip(cols["query_id"], cols["doc_id"], cols["source"], cols["positive"]):
        labelled[source].add((q, d))
        if positive and source == "human":
            human.add((q, d))
        elif positive:
            chosen[source].add((q, d))
    rows = []
    for source in (s for s in LLM_SOURCES if s in labelled):
        for low, high in POSITION_BUCKETS:
            here = [k for k in human & labelled[source] if low <= shown.get(k, 0) <= high]
            if not here:
                continue
            hits = sum(k in chosen[source] for k in here)
            rows.append(
                {
                    "source": source,
                    "shown_at": str(low) if low == high else (f"{low}-{high}" if high < 10**6 else f"{low}+"),
                    "human_positives": len(here),
                    "recall": round(hits / len(here), 4),
                }
            )
    return rows


def graded_kappa(labels: pa.Table) -> dict | None:
    """The judge's 0-3 grades against the qrels grades, on pool passages that have both."""
    cols = {c: labels.column(c).to_pylist() for c in ["query_id", "doc_id", "source", "grade"]}
    human, judge = {}, {}
    for q, d, source, grade in zip(cols["query_id"], cols["doc_id"], cols["source"], cols["grade"]):
        if grade is None:
            continue
        if source == "human":
            human[(q, d)] = grade
        elif source == "graded":
            judge[(q, d)] = grade
    both = sorted(set(human) & set(judge))
    if not both:
        return None
    a = [human[k] for k in both]
    b = [judge[k] for k in both]
    categories = sorted(set(a) | set(b) | {0, 1, 2, 3})
    return {
        "pairs": len(both),
        "kappa": _round(cohen_kappa(a, b, categories)),
        "kappa_linear": _round(cohen_kappa(a, b, categories, "linear")),
        "exact_agreement": round(sum(x == y for x, y in zip(a, b)) / len(both), 4),
    }


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
    labels: pa.Table,
    summaries: dict[str, dict],
    model: str,
    shown: dict[tuple[str, str], int] | None = None,
) -> str:
    rows = agreement(labels, summaries)
    kappa = graded_kappa(labels)
    by_position = agreement_by_position(labels, shown) if shown else []
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
