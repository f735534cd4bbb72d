"""The paper's published numbers beside a run's own (the report's "Paper beside ours").

``paper.yaml`` holds them (Table 2, the loss and union ablations, the label statistics, NQ RAG). A paper
row is shown where the run has the same kind of number: a train setting with the same label settings
scored on the same set and metric, an annotation stage's agreement with the human positives, a RAG
retriever on NQ at the same k. Every such pair is marked with what differs from the paper's run
(scale, annotator, backbone), since a local run differs in all three.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from utilrag.config import PipelineConfig
from utilrag.report.render import Block, Heading, Para, Table

PAPER_FILE = Path(__file__).with_name("paper.yaml")
# A paper setting's keys left out mean these (the paper's defaults: SumMargLH, Pos-all, no curriculum).
SETTING_DEFAULTS: dict[str, Any] = {
    "labels": "human",
    "curriculum_human_percent": None,
    "human_mix_percent": None,
    "loss": "summarg",
    "positives": "all",
}


@cache
def published() -> dict:
    return yaml.safe_load(PAPER_FILE.read_text(encoding="utf-8"))


def _matches(paper_setting: dict, run: Any) -> bool:
    wanted = {**SETTING_DEFAULTS, **paper_setting}
    return all(getattr(run, key) == value for key, value in wanted.items())


def _same_set(column: list, row: dict) -> bool:
    dataset, split, _ = column
    return row["dataset"] == dataset and (split is None or str(row.get("split", "")).startswith(split))


def differences(cfg: PipelineConfig, annotation: dict) -> list[str]:
    """What this run does not share with the paper's: the data's scale, the annotator (as the annotation
    report names it, else the config), the backbone."""
    out = []
    if cfg.train.dataset != "tevatron-msmarco" or cfg.train.max_queries or any(p.max_queries for p in cfg.pools):
        out.append(f"scale ({cfg.train.dataset}, not MS MARCO's 491k training queries)")
    named = [t["model"] for t in annotation.get("targets") or [] if t.get("model") not in (None, "unknown")]
    annotator = named[0] if named else cfg.annotate.model if cfg.annotate else None
    if annotator and "qwen2.5-32b" not in annotator.lower():
        out.append(f"annotator ({annotator.rsplit('/', 1)[-1]}, not Qwen-2.5-32B)")
    if "retromae" not in cfg.train.model.lower():
        out.append(f"backbone ({cfg.train.model.rsplit('/', 1)[-1]}, not RetroMAE)")
    return out


def pairs(cfg: PipelineConfig, retrieval: dict, annotation: dict, rag: dict) -> list[dict]:
    """Every (ours, paper) pair the run covers, in percent."""
    paper = published()
    runs = {r.name: r for r in cfg.train.runs()}
    found: list[dict] = []
    for row in retrieval.get("rows") or []:
        run = runs.get(row.get("setting") or "")
        if run is None:
            continue
        candidates = [(p["name"], col, v) for p in paper["retrieval"]["rows"] if _matches(p["setting"], run)
                      for col, v in zip(paper["retrieval"]["columns"], p["values"])]  # fmt: skip
        candidates += [(a["name"], a["column"], a["value"]) for a in paper["ablations"] if _matches(a["setting"], run)]
        for name, column, value in candidates:
            if _same_set(column, row) and row.get(column[2]) is not None:
                found.append(
                    {
                        "what": "retrieval",
                        "ours": f"{row['label']} on {row['dataset']}",
                        "paper": name,
                        "metric": column[2],
                        "ours_value": 100 * float(row[column[2]]),
                        "paper_value": value,
                    }
                )
    by_source = {p["source"]: p for p in paper["labels"]}
    for target in annotation.get("targets") or []:
        for row in target.get("agreement") or []:
            theirs = by_source.get(row.get("source"))
            for key in ("precision", "recall", "positives_per_query"):
                if theirs is None or row.get(key) is None:
                    continue
                scale = 1 if key == "positives_per_query" else 100
                found.append(
                    {
                        "what": "labels",
                        "ours": f"{row['source']} of {target['folder'].split('/', 1)[-1]}",
                        "paper": f"{row['source']} (Qwen-2.5-32B, MS MARCO)",
                        "metric": key.replace("_", " "),
                        "ours_value": scale * float(row[key]),
                        "paper_value": theirs[key],
                    }
                )
    for data in rag.get("datasets") or []:
        for row in data.get("results") or []:
            run = runs.get(str(row.get("retriever")))
            for theirs in paper["rag"]:
                if run is None or not _matches(theirs["setting"], run):
                    continue
                # NQ under any of its names here (nq-open-dev, dpr-nq-test), at the paper's k
                if theirs["dataset"] not in data["dataset"].split("-") or row.get("k") != theirs["k"]:
                    continue
                for key, metric in (("exact_match", "EM"), ("f1", "F1")):
                    if row.get(key) is not None:
                        found.append(
                            {
                                "what": "RAG",
                                "ours": f"{row['retriever']} top-{row['k']} on {data['dataset']}",
                                "paper": f"{theirs['name']} ({theirs['generator']})",
                                "metric": metric,
                                "ours_value": float(row[key]),
                                "paper_value": theirs[metric],
                            }
                        )
    return found


def section(cfg: PipelineConfig, retrieval: dict, annotation: dict, rag: dict) -> tuple[list[Block], dict]:
    """The report's "Paper beside ours" section and its numbers."""
    found = pairs(cfg, retrieval, annotation, rag)
    differ = differences(cfg, annotation)
    blocks: list[Block] = [Heading("Paper beside ours")]
    if not found:
        blocks.append(
            Para(
                "This run covers none of the paper's published rows (Table 2: MS MARCO dev MRR@10 / R@1000, DL19 "
                "and DL20 nDCG@10 and the BEIR-14 mean of train settings with the paper's label settings; the "
                "label statistics of RelSel, UtilSel and UtilRank; NQ top-5 RAG). Numbers in "
                f"{PAPER_FILE.name} (docs/reproduce.md).",
                "muted",
            )
        )
        return blocks, {"pairs": [], "differences": differ}
    if differ:
        blocks.append(
            Para("Not the paper's run: different " + "; ".join(differ) + ". Compare the shape, not the level.", "warn")
        )
    blocks.append(
        Table(
            ["", "ours", "paper row", "metric", "ours", "paper"],
            [
                [p["what"], p["ours"], p["paper"], p["metric"], f"{p['ours_value']:.1f}", f"{p['paper_value']:.1f}"]
                for p in found
            ],
            {4, 5},
        )
    )
    blocks.append(Para("Percent (positives per query: a count). Paper numbers from Zhang et al., EMNLP 2025.", "muted"))
    return blocks, {"pairs": found, "differences": differ}
