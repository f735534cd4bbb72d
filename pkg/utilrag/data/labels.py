"""Labels made elsewhere (``train.labels: external``): a file of positives per query, as the authors
published theirs for MS MARCO and NQ, or a user's, trained on and compared with the human positives like
our own LLM labels.

Accepted: Parquet with ``query_id, doc_id`` (optional ``score`` or ``rank``); JSONL of objects with a query
id (``query_id`` / ``qid``) and a passage id (``doc_id`` / ``docid`` / ``pid``); TSV lines ``qid docid
[score]`` (a header line is skipped; a score of 0 or below, BEIR's non-positive, is left out) or TREC qrels
``qid 0 docid grade`` (grade > 0 is a positive). Every other listed pair is a positive (a score or rank
does not cut). A line that cannot be read is one error naming file, line and
reason; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow.compute as pc
import pyarrow.fs as pafs

from utilrag import store
from utilrag.data.formats import open_lines
from utilrag.data.tables import read_table
from utilrag.errors import UtilragError

QUERY_KEYS = ("query_id", "qid")
DOC_KEYS = ("doc_id", "docid", "pid")


class LabelsFileError(UtilragError):
    """An external labels file that cannot be read (one line: file, line, reason; exit 2)."""


def _first(obj: dict, keys: tuple[str, ...]) -> str | None:
    value = next((obj[k] for k in keys if k in obj and obj[k] is not None), None)
    return None if value is None else str(value)


def read_external_labels(path: str) -> dict[str, set[str]]:
    """The positives per query of a labels file (formats in the module docstring)."""
    if not store.exists(path):
        raise LabelsFileError(f"{path}: labels file not found")
    positives: dict[str, set[str]] = defaultdict(set)
    fs, inner = store.filesystem(path)
    if path.endswith(".parquet") or fs.get_file_info(inner).type == pafs.FileType.Directory:
        table = read_table(path)
        missing = [c for c in ("query_id", "doc_id") if c not in table.column_names]
        if missing:
            raise LabelsFileError(f"{path}: no column {missing[0]!r} (columns: {table.column_names})")
        queries = pc.cast(table.column("query_id"), "string").to_pylist()
        docs = pc.cast(table.column("doc_id"), "string").to_pylist()
        for n, (q, d) in enumerate(zip(queries, docs), start=1):
            if not q or not d:
                raise LabelsFileError(f"{path}: row {n}: empty query_id or doc_id")
            positives[q].add(d)
        return dict(positives)
    jsonl = path.rstrip("/").removesuffix(".gz").endswith((".jsonl", ".json"))
    for n, raw in enumerate(open_lines(path), start=1):
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelsFileError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise LabelsFileError(f"{path}:{n}: expected an object with a query id and a doc id")
            q, d = _first(obj, QUERY_KEYS), _first(obj, DOC_KEYS)
            if not q or not d:
                raise LabelsFileError(f"{path}:{n}: needs {'/'.join(QUERY_KEYS)} and {'/'.join(DOC_KEYS)}")
            positives[q].add(d)
            continue
        cols = line.split()
        if n == 1 and cols[0].lower() in ("query-id", "query_id", "qid", "query"):
            continue  # a header (BEIR's qrels TSV: query-id corpus-id score)
        if len(cols) == 2:
            positives[cols[0]].add(cols[1])
        elif len(cols) in (3, 4):  # qid docid score (BEIR: 0 or below is judged not relevant), TREC qrels
            doc, value = (cols[1], cols[2]) if len(cols) == 3 else (cols[2], cols[3])
            try:
                positive = float(value) > 0
            except ValueError:
                raise LabelsFileError(f"{path}:{n}: {value!r} is not a number (a score or grade)") from None
            if positive:
                positives[cols[0]].add(doc)
        else:
            raise LabelsFileError(
                f"{path}:{n}: expected 'qid docid [score]' or 'qid 0 docid grade' ({len(cols)} fields)"
            )
    return dict(positives)


def agreement(positives: dict[str, set[str]], human: dict[str, set[str]], pools: dict[str, list[str]]) -> dict:
    """Precision and recall of the labels' positives against the human positives over the pooled queries
    both label (micro, as the annotation report's), positives per query, and the coverage."""
    queries = [q for q in pools if q in positives and q in human]
    chosen = sum(len(positives[q]) for q in queries)
    relevant = sum(len(human[q]) for q in queries)
    correct = sum(len(positives[q] & human[q]) for q in queries)
    return {
        "queries": len(queries),
        "pooled_queries": len(pools),
        "labelled_queries_outside_the_pools": sum(1 for q in positives if q not in pools),
        "precision": round(correct / chosen, 4) if chosen else None,
        "recall": round(correct / relevant, 4) if relevant else None,
        "positives_per_query": round(chosen / len(queries), 2) if queries else 0.0,
        "positives_outside_the_pool": sum(len(positives[q] - set(pools[q])) for q in queries),
    }
