"""Question-answering sets for RAG evaluation: the published formats -> a ``qa`` and a ``corpus`` table.

Pure functions (no Ray). Every record becomes a row or a reject ``{file, line, reason, raw}`` — nothing
is dropped silently; what is kept but worth knowing (unanswerable questions, title clashes) is counted
in ``QAData.stats``. ``line`` is 1-based: the line number for JSONL/CSV/TSV, the record's ordinal for
whole-file JSON (the question's for SQuAD, the list item's for HotpotQA, the row's for MS MARCO).

Files are read through pyarrow filesystems (local paths, s3://, gs://); gzip is recognised by its
magic bytes, so ``.gz`` (or a misnamed compressed file) reads like the plain one.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from utilrag import store
from utilrag.data.formats import RAW_CHARS, RowError, UnreadableFile, json_object, open_binary, row_id
from utilrag.data.registry import REGISTRY, download
from utilrag.data.tables import SCHEMAS
from utilrag.errors import UtilragError

QA_SCHEMA = SCHEMAS["qa"]  # gold_doc_ids is empty where the set names no gold passage
CORPUS_SCHEMA = SCHEMAS["corpus"]

SNIFF_BYTES = 1 << 16
MSMARCO_NO_ANSWER = "No Answer Present."
DPR_PASSAGES_HEADER = ["id", "text", "title"]


class QADataError(UtilragError):
    """A QA file that cannot be read at all (missing, not the format, malformed JSON)."""


@dataclass
class QAData:
    qa: pa.Table  # QA_SCHEMA
    corpus: pa.Table  # CORPUS_SCHEMA; empty for answer-only sets (NQ-open, DPR qa files)
    rejects: list[dict] = field(default_factory=list)  # {file, line, reason, raw}
    stats: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. MS MARCO's well_formed answers
    format: str = ""

    def answers(self) -> dict[str, list[str]]:
        """query_id -> gold answers, in file order (what the metrics take)."""
        return dict(zip(self.qa.column("query_id").to_pylist(), self.qa.column("answers").to_pylist()))


class _Columns:
    """Rows of one schema, collected column-wise and converted in chunks, so a 21M-passage TSV never
    sits in memory as Python objects all at once."""

    CHUNK = 100_000

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.columns: list[list] = [[] for _ in schema.names]
        self.batches: list[pa.RecordBatch] = []
        self.count = 0

    def add(self, *values: Any) -> None:
        for column, value in zip(self.columns, values, strict=True):
            column.append(value)
        self.count += 1
        if len(self.columns[0]) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.columns[0]:
            self.batches.append(pa.RecordBatch.from_arrays(self.columns, schema=self.schema))
            self.columns = [[] for _ in self.schema.names]

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self.batches, schema=self.schema)


class Collector:
    """What every QA reader writes into: questions, passages, rejects ``{file, line, reason, raw}`` and
    counts. A record is read inside ``with out.record(line, raw):``: a RowError raised there becomes
    that record's reject, and the reader goes on. Question and passage ids are unique here, so no
    reader keeps its own sets; ``id_name`` is how the format calls its question id (in the reason)."""

    def __init__(self, location: str, fmt: str, id_name: str = "id") -> None:
        self.location, self.format, self.id_name = location, fmt, id_name
        self.qa, self.corpus = _Columns(QA_SCHEMA), _Columns(CORPUS_SCHEMA)
        self.rejects: list[dict] = []
        self.stats: Counter[str] = Counter()
        self._questions: set[str] = set()
        self._passages: set[str] = set()

    @contextmanager
    def record(self, line: int, raw: Any) -> Iterator[None]:
        try:
            yield
        except RowError as e:
            self.reject(line, str(e), raw)

    def reject(self, line: int, reason: str, raw: Any) -> None:
        if not isinstance(raw, str):
            try:
                raw = json.dumps(raw, ensure_ascii=False)
            except (TypeError, ValueError):
                raw = repr(raw)
        self.rejects.append(dict(file=self.location, line=line, reason=reason, raw=raw[:RAW_CHARS]))

    def question(self, qid: str, question: str, answers: list[str], gold: list[str]) -> None:
        """One question row; a repeated id is the record's reject (the first one stays)."""
        if qid in self._questions:
            raise RowError(f"duplicate {self.id_name} {qid!r}")
        self._questions.add(qid)
        self.qa.add(qid, question, answers, gold)

    def has_passage(self, doc_id: str) -> bool:
        return doc_id in self._passages

    def passage(self, doc_id: str, title: str, text: str) -> None:
        self._passages.add(doc_id)
        self.corpus.add(doc_id, title, text)

    def finish(self, **extra: Any) -> QAData:
        self.stats.update(questions=self.qa.count, corpus=self.corpus.count, rejects=len(self.rejects))
        return QAData(self.qa.table(), self.corpus.table(), self.rejects, dict(self.stats), extra, self.format)


def doc_id_of(text: str) -> str:
    """Ids are whitespace-free everywhere in the repo (the TREC formats split on it)."""
    return re.sub(r"\s", "_", text)


# --------------------------------------------------------------------------- reading files
def read_bytes(location: str) -> bytes:
    try:
        with open_binary(location) as f:
            return f.read()
    except UnreadableFile as e:
        raise QADataError(str(e)) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise QADataError(f"{location}: truncated or corrupt gzip ({e})") from None


def _read_json(location: str) -> Any:
    try:
        text = read_bytes(location).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise QADataError(f"{location}: not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise QADataError(
            f"{location}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
        ) from None


def _lines(location: str, out: Collector) -> Iterator[tuple[int, str]]:
    """(line number, text without the line end); undecodable and blank lines become rejects."""
    line_no = 0
    with open_binary(location) as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    out.reject(line_no, f"invalid UTF-8 at byte {e.start}", raw.decode("utf-8", "replace"))
                    continue
                if not text.strip():
                    out.reject(line_no, "empty line", text)
                    continue
                yield line_no, text
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            out.reject(line_no + 1, f"truncated or corrupt gzip after line {line_no}: {e}", "")


# --------------------------------------------------------------------------- field checks
def _question(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowError("missing or empty question text")
    return value


def _strings(value: Any, what: str, nonempty: bool = True) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowError(f"{what} is not a list of strings")
    if nonempty and not value:
        raise RowError(f"{what} is an empty list")
    return value


def _tsv(text: str) -> list[str]:
    # DPR writes and reads these files with csv (tab-delimited, "-quoted fields with "" escapes).
    return next(csv.reader([text], delimiter="\t"))


# --------------------------------------------------------------------------- SQuAD
def _squad_answers(q: dict) -> list[str]:
    answers = q.get("answers", [])
    ok = isinstance(answers, list) and all(isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers)
    if not ok:
        raise RowError("answers is not a list of {'text': string} objects")
    return [a["text"] for a in answers]


def read_squad(location: str) -> QAData:
    """SQuAD v1.1 / v2.0 JSON. Corpus: the paragraphs (doc_id ``title#index``); gold: the question's paragraph."""
    obj = _read_json(location)
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise QADataError(f"{location}: not SQuAD JSON (expected an object with a 'data' list of articles)")
    out = Collector(location, "squad", id_name="question id")
    ordinal = 0  # questions seen so far: the reject's "line"
    for a_i, article in enumerate(obj["data"], start=1):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            out.reject(ordinal + 1, f"article {a_i} is not an object with a 'paragraphs' list", article)
            continue
        title = article.get("title")
        bad_title = None if isinstance(title, str) and title.strip() else f"article {a_i} has no title"
        for p_i, para in enumerate(article["paragraphs"]):
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list):
                out.reject(ordinal + 1, f"article {a_i} paragraph {p_i} is not an object with a 'qas' list", para)
                continue
            # A paragraph that cannot be a corpus row takes its questions with it, each rejected by ordinal.
            problem = bad_title
            context = para.get("context")
            doc_id = doc_id_of(f"{title}#{p_i}")
            if problem is None and (not isinstance(context, str) or not context.strip()):
                problem = f"article {a_i} paragraph {p_i} has an empty or missing context"
            if problem is None and out.has_passage(doc_id):
                problem = f"duplicate doc id {doc_id!r} (two articles titled {title!r})"
            if problem is None:
                out.passage(doc_id, str(title), str(context))
            elif not para["qas"]:
                out.reject(ordinal + 1, problem, para)
            for q in para["qas"]:
                ordinal += 1
                with out.record(ordinal, q):
                    if problem:
                        raise RowError(problem)
                    if not isinstance(q, dict):
                        raise RowError("question is not an object")
                    qid = row_id(q.get("id"), "question id")
                    question = _question(q.get("question"))
                    answers = _squad_answers(q)
                    impossible = q.get("is_impossible") is True  # SQuAD v2: kept, scored as "no answer"
                    if not answers and not impossible:
                        raise RowError("no answers (and not marked is_impossible)")
                    out.question(qid, question, answers, [doc_id])
                    out.stats.update(unanswerable=int(impossible), answers=len(answers))
    return out.finish()


# --------------------------------------------------------------------------- NQ-open
def read_nq_open(location: str) -> QAData:
    """NQ-open JSONL ``{"question", "answer": [...]}``; query_id ``nq-<line>`` unless the line has an "id"."""
    out = Collector(location, "nq-open")
    for line_no, text in _lines(location, out):
        with out.record(line_no, text):
            obj = json_object(text)
            qid = row_id(obj["id"], "id") if "id" in obj else f"nq-{line_no}"
            question = _question(obj.get("question"))
            answers = _strings(obj.get("answer"), "answer")
            out.question(qid, question, answers, [])
            out.stats["answers"] += len(answers)
    return out.finish()


# --------------------------------------------------------------------------- DPR
def read_dpr_qa(location: str) -> QAData:
    """DPR's ``*.qa.csv``: ``question<TAB>['answer', ...]`` (a Python literal); query_id ``dpr-<line>``."""
    out = Collector(location, "dpr-qa")
    for line_no, text in _lines(location, out):
        with out.record(line_no, text):
            cols = _tsv(text)
            if len(cols) != 2:
                raise RowError(f"expected 2 tab-separated columns (question, answers), found {len(cols)}")
            question = _question(cols[0])
            try:
                value = ast.literal_eval(cols[1].strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise RowError("answers are not a Python literal list") from None
            answers = _strings(value, "answers")
            out.question(f"dpr-{line_no}", question, answers, [])
            out.stats["answers"] += len(answers)
    return out.finish()


def read_dpr_passages(location: str) -> QAData:
    """DPR's ``psgs_w100.tsv`` (header ``id<TAB>text<TAB>title``) as a corpus; no questions."""
    out = Collector(location, "dpr-passages")
    for line_no, text in _lines(location, out):
        with out.record(line_no, text):
            cols = _tsv(text)
            if line_no == 1 and cols == DPR_PASSAGES_HEADER:
                continue  # the header, and only it
            if len(cols) != 3:
                raise RowError(f"expected 3 tab-separated columns (id, text, title), found {len(cols)}")
            doc_id = row_id(cols[0], "passage id")
            if not cols[1].strip():
                raise RowError("empty passage text")
            if out.has_passage(doc_id):
                raise RowError(f"duplicate passage id {doc_id!r}")
            out.passage(doc_id, cols[2], cols[1])
    return out.finish()


# --------------------------------------------------------------------------- HotpotQA
def _hotpot_context(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(p, list)
        and len(p) == 2
        and isinstance(p[0], str)
        and isinstance(p[1], list)
        and all(isinstance(s, str) for s in p[1])
        for p in value
    ):
        raise RowError("context is not a list of [title, [sentences]] pairs")
    return [(p[0], "".join(p[1])) for p in value]


def _hotpot_supporting(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and isinstance(f[1], int) for f in value
    ):
        raise RowError("supporting_facts is not a list of [title, sentence index] pairs")
    return list(dict.fromkeys(doc_id_of(f[0]) for f in value))  # distinct, in order


def read_hotpotqa(location: str) -> QAData:
    """HotpotQA JSON (distractor or fullwiki). Corpus: the context paragraphs, one per title (doc_id =
    the title); gold: the supporting facts' titles."""
    items = _read_json(location)
    if not isinstance(items, list):
        raise QADataError(f"{location}: not HotpotQA JSON (expected a list of question objects)")
    out = Collector(location, "hotpotqa", id_name="_id")
    texts: dict[str, str] = {}
    golds: list[str] = []
    for ordinal, item in enumerate(items, start=1):
        with out.record(ordinal, item):
            if not isinstance(item, dict):
                raise RowError("item is not an object")
            qid = row_id(item.get("_id"), "_id")
            question = _question(item.get("question"))
            answer = item.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise RowError("answer is not a string")
            context = _hotpot_context(item.get("context"))
            gold = _hotpot_supporting(item.get("supporting_facts"))
            out.question(qid, question, [answer] if answer is not None else [], gold)
            out.stats["no_answer"] += answer is None  # the test sets publish no answers
            for title, text in context:
                doc_id = doc_id_of(title)
                if not text.strip():
                    out.stats["empty_paragraphs"] += 1
                elif doc_id not in texts:
                    texts[doc_id] = text
                    out.passage(doc_id, title, text)
                elif texts[doc_id] != text:
                    out.stats["title_conflicts"] += 1  # same title, other text: the first one stays
            golds.extend(gold)
    # fullwiki contexts are retrieved paragraphs: a supporting title need not be among them.
    out.stats["gold_not_in_corpus"] = sum(g not in texts for g in golds)
    return out.finish()


# --------------------------------------------------------------------------- MS MARCO QnA
def _marco_answers(value: Any) -> list[str]:
    answers = [a for a in _strings(value, "answers", nonempty=False) if a != MSMARCO_NO_ANSWER]
    return answers


def _marco_well_formed(value: Any) -> list[str]:
    if value is None or value == "[]":  # the published file writes "no well-formed answer" as the string "[]"
        return []
    return _strings(value, "wellFormedAnswers", nonempty=False)


def _marco_passages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not all(
        isinstance(p, dict) and isinstance(p.get("passage_text"), str) for p in value
    ):
        raise RowError("passages is not a list of objects with a 'passage_text' string")
    return value


def read_msmarco_qna(location: str) -> QAData:
    """MS MARCO QnA v2.1 JSON (column-oriented). Corpus: every passage (doc_id ``<query_id>-<index>``);
    gold: the passages with is_selected == 1; well-formed answers in ``extra["well_formed"]``."""
    obj = _read_json(location)
    columns = ("query", "query_id", "answers", "passages")
    if not isinstance(obj, dict) or not all(isinstance(obj.get(c), dict) for c in columns):
        raise QADataError(f"{location}: not MS MARCO QnA v2.1 JSON (expected an object with {', '.join(columns)})")
    well_formed_col = obj.get("wellFormedAnswers")
    if not isinstance(well_formed_col, dict):
        well_formed_col = {}
    out = Collector(location, "msmarco-qna", id_name="query_id")
    well_formed: dict[str, list[str]] = {}
    keys = list(obj["query"])
    for ordinal, key in enumerate(keys, start=1):
        row = {c: obj[c].get(key) for c in (*columns, "wellFormedAnswers") if c in obj}
        with out.record(ordinal, row):
            missing = [c for c in columns if key not in obj[c]]
            if missing:
                raise RowError(f"row {key!r} has no {', '.join(missing)}")
            qid = row_id(row["query_id"], "query_id")
            question = _question(row["query"])
            answers = _marco_answers(row["answers"])
            wf = _marco_well_formed(well_formed_col.get(key))
            passages = [(doc_id_of(f"{qid}-{i}"), p) for i, p in enumerate(_marco_passages(row["passages"]))]
            kept = [(doc_id, p) for doc_id, p in passages if p["passage_text"].strip()]
            out.question(qid, question, answers, [doc_id for doc_id, p in kept if p.get("is_selected") == 1])
            # "No Answer Present." (or an empty list): kept with answers=[]
            out.stats.update(no_answer=int(not answers), empty_passages=len(passages) - len(kept))
            if wf:
                well_formed[qid] = wf
            for doc_id, p in kept:
                out.passage(doc_id, "", p["passage_text"])
    # rows present in another column but not in "query" would otherwise vanish unseen
    known = set(keys)
    orphans = sorted({k for c in columns[1:] for k in obj[c] if k not in known})
    for key in orphans:
        out.reject(len(keys) + 1, f"row {key!r} has no query", {c: obj[c].get(key) for c in columns})
    out.stats["well_formed"] = len(well_formed)
    return out.finish(well_formed=well_formed)


# --------------------------------------------------------------------------- detection and dispatch
READERS: dict[str, Callable[[str], QAData]] = {  # Registered.qa_format
    "squad": read_squad,
    "nq-open": read_nq_open,
    "dpr-qa": read_dpr_qa,
    "dpr-passages": read_dpr_passages,
    "hotpotqa": read_hotpotqa,
    "msmarco-qna": read_msmarco_qna,
}
EXPECTED = "SQuAD v1.1/v2.0 JSON, NQ-open JSONL, DPR qa.csv or psgs_w100.tsv, HotpotQA JSON or MS MARCO QnA v2.1 JSON"
_MARCO_HEAD = re.compile(r'\{\s*"(answers|passages|query|query_id|query_type|wellFormedAnswers)"\s*:\s*\{\s*"0"')
_SQUAD_HEAD = re.compile(r'\{\s*"(data|version)"\s*:')


def _head(location: str) -> str:
    try:
        with open_binary(location) as f:
            head = f.read(SNIFF_BYTES)
    except UnreadableFile as e:
        raise QADataError(str(e)) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise QADataError(f"{location}: truncated or corrupt gzip ({e})") from None
    return head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")


def detect_format(location: str) -> str:
    """One of READERS' names, from the file's first bytes (decompressed); QADataError if none fits."""
    head = _head(location)
    if _MARCO_HEAD.match(head):
        return "msmarco-qna"
    if _SQUAD_HEAD.match(head) and '"paragraphs"' in head:
        return "squad"
    if head.startswith("[") and ('"supporting_facts"' in head or '"_id"' in head):
        return "hotpotqa"
    first = head.split("\n", 1)[0].rstrip("\r")
    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "question" in obj and "answer" in obj:
            return "nq-open"
    elif "\t" in first:
        cols = _tsv(first)
        if cols == DPR_PASSAGES_HEADER:
            return "dpr-passages"
        if len(cols) == 2 and cols[1].lstrip().startswith("["):
            return "dpr-qa"
    raise QADataError(f"{location}: unrecognised QA format; expected {EXPECTED}")


def read_qa(location: str, format: str = "auto") -> QAData:
    """Read any supported QA file (format ``auto`` detects it)."""
    fmt = detect_format(location) if format == "auto" else format
    if fmt not in READERS:
        raise QADataError(f"{location}: unknown QA format {format!r}; expected auto or one of {', '.join(READERS)}")
    return READERS[fmt](location)


# --------------------------------------------------------------------------- registered sets
def _file_names(published: str) -> list[str]:
    base = published[: -len(".gz")] if published.endswith(".gz") else published
    return [published, base if published.endswith(".gz") else f"{base}.gz"]


def resolve_qa(
    name_or_path: str | os.PathLike, data_root: str | os.PathLike | None, allow_download: bool = False
) -> str:
    """The local file of a registered QA set (``kind: qa`` in data/registry.py) under
    ``<data_root>/<name>/`` (fetched from its official URL when missing and allowed), or an existing
    path as given."""
    name_or_path = str(name_or_path)
    entry = REGISTRY.get(name_or_path)
    if entry is None or entry.kind != "qa":
        if store.exists(name_or_path):
            return name_or_path
        raise QADataError(
            f"{name_or_path}: neither an existing file nor a registered QA set ({', '.join(registered_qa())})"
        )
    if not data_root:
        raise QADataError(f"{name_or_path}: a registered QA set needs a data root folder to look in")
    folder = store.join(str(data_root), name_or_path)
    for name in _file_names(entry.qa_file):
        candidate = store.join(folder, name)
        if store.exists(candidate):
            return candidate
    if allow_download and not store.is_remote(folder):
        download(name_or_path, Path(folder))
        return store.join(folder, entry.qa_file)
    urls = " and ".join(url for url, _ in entry.downloads)
    raise QADataError(
        f"{name_or_path}: {folder} has no {' or '.join(_file_names(entry.qa_file))}; download it from {urls}"
    )


def registered_qa() -> list[str]:
    return [name for name, reg in REGISTRY.items() if reg.kind == "qa"]
