"""Line parsers for the real formats, and a reader that turns one file into Arrow batches.

Every line becomes either a row or a reject carrying (file, line, reason, raw) — nothing is
dropped. Files are opened through pyarrow filesystems, so local paths and s3:// / gs:// URIs
read alike; ``.gz`` is decompressed on the fly and a truncated stream becomes one reject.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import zlib
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import IO

import pyarrow as pa
import pyarrow.fs as pafs

from utilrag import store
from utilrag.data.tables import parse_schema
from utilrag.errors import UtilragError

GZIP_MAGIC = b"\x1f\x8b"
RAW_CHARS = 300  # how much of a bad line is kept in the rejects table


class UnreadableFile(UtilragError, OSError):
    """A file that cannot be opened: one line at the CLI; an OSError to a reader that makes it a reject."""


class RowError(ValueError):
    """A line that cannot become a row; the message is the reject reason."""


# --------------------------------------------------------------------------- filesystems
def list_files(uri: str) -> list[str]:
    """Files directly inside a folder (local or URI), as full paths/URIs, sorted."""
    uri = store.normalize(uri)
    fs, path = store.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    prefix = uri[: len(uri) - len(path)] if "://" in uri else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


@contextmanager
def open_binary(location: str) -> Iterator[IO[bytes]]:
    """A file's content as a binary stream (local path or URI), gunzipped when it starts with the gzip
    magic: a ``.gz`` file, or a compressed file under a plain name, reads like the plain one."""
    fs, path = store.filesystem(location)
    try:
        # compression=None: pyarrow would otherwise guess from the extension; we go by the bytes.
        raw = io.BufferedReader(fs.open_input_stream(path, compression=None), buffer_size=1 << 20)
    except OSError as e:
        raise UnreadableFile(f"{location}: cannot open ({e})") from None
    try:
        # GzipFile does not close the stream it wraps, hence the finally.
        yield gzip.GzipFile(fileobj=raw) if raw.peek(2)[:2] == GZIP_MAGIC else raw  # type: ignore[misc]
    finally:
        raw.close()


def open_lines(uri: str) -> Generator[bytes, None, None]:
    with open_binary(uri) as handle:
        yield from handle


# --------------------------------------------------------------------------- line parsers
def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is not a string")
    return value


def row_id(value, what: str) -> str:
    """An id as the TREC formats need it: a string or an integer, not empty, no whitespace."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"empty or missing {what}")
    if any(c.isspace() for c in value):
        raise RowError(f"{what} {value!r} contains whitespace")
    return value


def _nonempty(text: str, what: str) -> str:
    if not text.strip():
        raise RowError(f"empty {what}")
    return text


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RowError(f"{what} {value!r} is not an integer") from None


def _columns(line: str, sep: str | None, allowed: tuple[int, ...]) -> list[str]:
    cols = line.split(sep) if sep else line.split()
    if len(cols) not in allowed:
        want = " or ".join(map(str, allowed))
        raise RowError(f"expected {want} columns, found {len(cols)}")
    return cols


def json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RowError("JSON line is not an object")
    return obj


def msmarco_collection(line: str, ctx) -> list[dict]:
    cols = _columns(line, "\t", (2, 3))  # pid text, or Tevatron's pid title text
    title, text = ("", cols[1]) if len(cols) == 2 else (cols[1], cols[2])
    return [dict(doc_id=row_id(cols[0], "doc id"), title=title, text=_nonempty(text, "passage text"))]


def tsv_queries(line: str, ctx) -> list[dict]:
    cols = _columns(line, "\t", (2,))
    return [dict(query_id=row_id(cols[0], "query id"), text=_nonempty(cols[1], "query text"))]


def trec_qrels(line: str, ctx) -> list[dict]:
    # TREC "qid Q0 docid grade" and MS MARCO's tab-separated "qid 0 pid 1" alike.
    cols = _columns(line, None, (4,))
    return [
        dict(
            query_id=row_id(cols[0], "query id"),
            doc_id=row_id(cols[2], "doc id"),
            grade=_int(cols[3], "grade"),
            split=ctx["split"],
        )
    ]


def beir_qrels(line: str, ctx) -> list[dict]:
    if ctx["line"] == 1 and line.lower().startswith("query-id"):
        return []  # BEIR's header row
    cols = _columns(line, "\t", (3,))
    return [
        dict(
            query_id=row_id(cols[0], "query id"),
            doc_id=row_id(cols[1], "doc id"),
            grade=_int(cols[2], "grade"),
            split=ctx["split"],
        )
    ]


def trec_run(line: str, ctx) -> list[dict]:
    cols = _columns(line, None, (6,))
    try:
        score = float(cols[4])
    except ValueError:
        raise RowError(f"score {cols[4]!r} is not a number") from None
    if not math.isfinite(score):
        raise RowError(f"score {cols[4]!r} is not finite")
    return [
        dict(
            query_id=row_id(cols[0], "query id"),
            doc_id=row_id(cols[2], "doc id"),
            rank=_int(cols[3], "rank"),
            score=score,
            run=ctx["run"],
        )
    ]


def beir_corpus(line: str, ctx) -> list[dict]:
    obj = json_object(line)
    title = obj.get("title") or ""
    return [
        dict(
            doc_id=row_id(obj.get("_id"), "_id"),
            title=_text(title, "title"),
            text=_nonempty(_text(obj.get("text"), "text"), "text"),
        )
    ]


def beir_queries(line: str, ctx) -> list[dict]:
    obj = json_object(line)
    return [dict(query_id=row_id(obj.get("_id"), "_id"), text=_nonempty(_text(obj.get("text"), "text"), "text"))]


def _tevatron(line: str) -> tuple[dict, list[tuple[dict, int]]]:
    obj = json_object(line)
    for key in ("query_id", "query", "positive_passages", "negative_passages"):
        if key not in obj:
            raise RowError(f"missing key {key!r}")
    passages = [(p, 1) for p in obj["positive_passages"]] + [(p, 0) for p in obj["negative_passages"]]
    for p, _ in passages:
        if not isinstance(p, dict) or "docid" not in p:
            raise RowError("a passage without 'docid'")
    return obj, passages


def tevatron_queries(line: str, ctx) -> list[dict]:
    obj, _ = _tevatron(line)
    return [dict(query_id=row_id(obj["query_id"], "query_id"), text=_nonempty(_text(obj["query"], "query"), "query"))]


def tevatron_corpus(line: str, ctx) -> list[dict]:
    _, passages = _tevatron(line)
    return [
        dict(
            doc_id=row_id(p["docid"], "docid"),
            title=_text(p.get("title") or "", "title"),
            text=_nonempty(_text(p.get("text"), "text"), "passage text"),
        )
        for p, _ in passages
    ]


def tevatron_qrels(line: str, ctx) -> list[dict]:
    obj, passages = _tevatron(line)
    qid = row_id(obj["query_id"], "query_id")
    return [
        dict(query_id=qid, doc_id=row_id(p["docid"], "docid"), grade=1, split=ctx["split"])
        for p, grade in passages
        if grade
    ]


def tevatron_pools(line: str, ctx) -> list[dict]:
    obj, passages = _tevatron(line)
    qid = row_id(obj["query_id"], "query_id")
    return [
        dict(
            query_id=qid,
            doc_id=row_id(p["docid"], "docid"),
            position=i,
            source="human" if grade else "tevatron",
            human_grade=grade if grade else None,
        )
        for i, (p, grade) in enumerate(passages)
    ]


def _field(record: dict, names: tuple[str, ...]):
    return next((record[n] for n in names if record.get(n) not in (None, "")), None)


def plain_corpus(record: dict, ctx) -> list[dict]:
    """A plain-layout document (data/plain.py) -> its passages: one under its id, or ``id#k`` each."""
    from utilrag.data.plain import passages

    doc_id = row_id(_field(record, ("id", "_id", "doc_id", "docid")), "id")
    if "#" in doc_id:
        raise RowError(f"id {doc_id!r} contains '#', which marks a passage of a document")
    title = _text(_field(record, ("title",)) or "", "title")
    text = _nonempty(_text(_field(record, ("text", "contents", "body")) or "", "text"), "text")
    pieces = passages(text, ctx["passage_words"], ctx["passage_overlap"])
    if len(pieces) == 1:
        return [dict(doc_id=doc_id, title=title, text=pieces[0])]
    return [dict(doc_id=f"{doc_id}#{k}", title=title, text=piece) for k, piece in enumerate(pieces)]


def plain_queries(record: dict, ctx) -> list[dict]:
    query_id = row_id(_field(record, ("id", "_id", "query_id", "qid")), "id")
    text = _nonempty(_text(_field(record, ("text", "query")) or "", "text"), "text")
    return [dict(query_id=query_id, text=text)]


# Parsers of whole records (data/plain.py reads them: a JSONL line, a CSV row, a Parquet row, a file).
RECORD_PARSERS: dict[str, Callable[[dict, dict], list[dict]]] = {f.__name__: f for f in [plain_corpus, plain_queries]}

PARSERS: dict[str, Callable[[str, dict], list[dict]]] = {
    f.__name__: f
    for f in [
        msmarco_collection,
        tsv_queries,
        trec_qrels,
        beir_qrels,
        trec_run,
        beir_corpus,
        beir_queries,
        tevatron_queries,
        tevatron_corpus,
        tevatron_qrels,
        tevatron_pools,
    ]
}


# --------------------------------------------------------------------------- file -> batches
def parse_file(uri: str, table: str, parser: str, ctx: dict, batch_rows: int = 20_000) -> Iterator[pa.Table]:
    """Yield Arrow batches (the table's columns + provenance) for every line of one file."""
    if parser in RECORD_PARSERS:
        yield from _parse_records(uri, table, parser, ctx, batch_rows)
        return
    schema = parse_schema(table)
    parse = PARSERS[parser]
    rows: list[dict] = []
    line_no = 0

    def reject(reason: str, raw: str) -> None:
        rows.append(dict(_file=uri, _line=line_no, _reason=reason, _raw=raw[:RAW_CHARS]))

    try:
        for line_no, raw in enumerate(open_lines(uri), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reject(f"invalid UTF-8 at byte {e.start}", raw.decode("utf-8", "replace"))
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                reject("empty line", line)
                continue
            try:
                for row in parse(line, {**ctx, "line": line_no}):
                    # the original line travels with the row: a later check that rejects it keeps it as read
                    row.update(_file=uri, _line=line_no, _raw=line[:RAW_CHARS])
                    rows.append(row)
            except RowError as e:
                reject(str(e), line)
            if len(rows) >= batch_rows:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        line_no += 1
        reject(f"truncated or corrupt gzip after line {line_no - 1}: {e}", "")
    except OSError as e:
        line_no += 1
        reject(f"read error after line {line_no - 1}: {e}", "")
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


def _parse_records(uri: str, table: str, parser: str, ctx: dict, batch_rows: int) -> Iterator[pa.Table]:
    """parse_file for the plain layout: records instead of lines, the same rows and rejects."""
    from utilrag.data.plain import Bad, records

    schema = parse_schema(table)
    parse = RECORD_PARSERS[parser]
    rows: list[dict] = []
    try:
        for position, raw, record in records(uri, table, ctx):
            if isinstance(record, Bad):
                rows.append(dict(_file=uri, _line=position, _reason=str(record), _raw=raw[:RAW_CHARS]))
                continue
            try:
                for row in parse(record, ctx):
                    row.update(_file=uri, _line=position, _raw=raw[:RAW_CHARS])
                    rows.append(row)
            except RowError as e:
                rows.append(dict(_file=uri, _line=position, _reason=str(e), _raw=raw[:RAW_CHARS]))
            if len(rows) >= batch_rows:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        rows.append(dict(_file=uri, _line=-1, _reason=f"truncated or corrupt file: {e}", _raw=""))
    except (OSError, ValueError) as e:  # an unreadable Parquet or CSV file: one reject, the file named
        rows.append(dict(_file=uri, _line=-1, _reason=f"read error: {e}", _raw=""))
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)
