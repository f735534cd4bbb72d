"""``layout: plain``: your own corpus, as it is.

A corpus is JSONL, CSV, TSV or Parquet records (``id``, ``text``, optional ``title``; other columns are
ignored), or a folder of ``.txt`` / ``.md`` files, one document each (its id: the path under the
folder). Optional queries beside it (``queries.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet`` with ``id``
and ``text``, or ``queries.txt``, one per line). No qrels are needed.

Passages: a document of more than ``passage_words`` words is cut into windows of that many words,
each starting ``passage_words - passage_overlap`` words after the last; passage ``k`` of document
``D`` has the id ``D#k`` (``#`` is kept for that), so every hit names its document. A shorter document
is one passage under its own id. Exact and near duplicates (the same words once case, punctuation and
spacing are set aside) are dropped, counted, and kept in the rejects file (ingest's ``Validator``).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import PurePosixPath

from utilrag import store

DOCUMENT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv", ".tsv", ".parquet")
SUFFIXES = DOCUMENT_SUFFIXES + RECORD_SUFFIXES
QUERY_FILE = re.compile(r"^queries\.(jsonl|jsonl\.gz|csv|tsv|parquet|txt)$")


class Bad(ValueError):
    """A record that cannot be read (its reason), raised by ``records``'s reader for one record."""


def suffix(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def list_tree(root: str) -> list[str]:
    """Every file under a folder (local or URI), recursively, sorted."""
    import pyarrow.fs as pafs

    root = store.normalize(root)  # s3://b/corpus/ and s3://b/corpus alike
    fs, path = store.filesystem(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    prefix = root.split("://", 1)[0] + "://" if store.is_remote(root) else ""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def doc_id_of(uri: str, root: str) -> str:
    """A document file's id: its path under the corpus folder, spaces as %20 (ids hold no whitespace)."""
    relative = uri[len(root.rstrip("/")) :].lstrip("/") if uri != root else PurePosixPath(uri).name
    return re.sub(r"\s", lambda m: f"%{ord(m.group(0)):02X}", relative)


def _document(uri: str, ctx: dict) -> Iterator[tuple[int, str, dict | Bad]]:
    """One .txt / .md file: one document (its title: a Markdown file's first heading)."""
    fs, path = store.filesystem(uri)
    size = fs.get_file_info(path).size or 0
    limit = int(ctx["max_document_mb"] * 2**20)
    if size > limit:
        yield 1, "", Bad(f"document of {size / 2**20:.1f} MB, over max_document_mb {ctx['max_document_mb']}")
        return
    with fs.open_input_stream(path) as f:
        data = f.read()
    if b"\x00" in data[:8192]:
        yield 1, data[:300].decode("utf-8", "replace"), Bad("binary file (NUL bytes), not text")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield 1, data[:300].decode("utf-8", "replace"), Bad(f"invalid UTF-8 at byte {e.start}")
        return
    title = ""
    if uri.lower().endswith(".md"):
        heading = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)
        title = heading.group(1) if heading else ""
    yield 1, text[:300], {"id": doc_id_of(uri, ctx["root"]), "title": title, "text": text}


def _rows(uri: str, kind: str) -> Iterator[tuple[int, str, dict | Bad]]:
    """Records of a JSONL / CSV / TSV / Parquet file: (position, raw, record or Bad)."""
    import json

    fs, path = store.filesystem(uri)
    if kind == ".parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            position = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=10_000):
                for row in batch.to_pylist():
                    position += 1
                    yield position, json.dumps(row, default=str)[:300], row
        return
    compression = "gzip" if uri.endswith(".gz") else None
    csv.field_size_limit(2**31 - 1)  # a long document in one field (the default stops at 128 KiB)
    with fs.open_input_stream(path, compression=compression) as f:
        # utf-8-sig: a byte-order mark (Excel's CSV export) is not part of the first column's name
        reader = io.TextIOWrapper(f, encoding="utf-8-sig", errors="strict", newline="")
        try:
            if kind in (".csv", ".tsv"):
                rows = csv.DictReader(reader, delimiter="\t" if kind == ".tsv" else ",")
                for position, row in enumerate(rows, start=2):  # line 1: the header
                    raw = "\t".join(str(v) for v in row.values())[:300]
                    yield position, raw, row if None not in row else Bad("more fields than the header names")
                return
            for position, line in enumerate(reader, start=1):
                if not line.strip():
                    yield position, line, Bad("empty line")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield position, line[:300], Bad(f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                yield position, line[:300], obj if isinstance(obj, dict) else Bad("JSON line is not an object")
        except UnicodeDecodeError as e:
            yield -1, "", Bad(f"invalid UTF-8 ({e.reason}); the rest of the file is unread")
        except csv.Error as e:
            yield -1, "", Bad(f"malformed CSV ({e}); the rest of the file is unread")


def _query_lines(uri: str) -> Iterator[tuple[int, str, dict | Bad]]:
    fs, path = store.filesystem(uri)
    with fs.open_input_stream(path) as f:
        for position, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="replace"), start=1):
            text = raw.strip()
            yield position, text, {"id": f"q{position}", "text": text} if text else Bad("empty line")


def records(uri: str, table: str, ctx: dict) -> Iterator[tuple[int, str, dict | Bad]]:
    kind = suffix(uri)
    if table == "queries" and kind == ".txt":
        return _query_lines(uri)
    if kind in DOCUMENT_SUFFIXES:
        return _document(uri, ctx)
    return _rows(uri, kind)


def passages(text: str, words: int, overlap: int) -> list[str]:
    """Windows of ``words`` words, each ``words - overlap`` after the last; one for a short text."""
    tokens = text.split()
    if len(tokens) <= words:
        return [" ".join(tokens)]
    step = words - overlap
    starts = range(0, max(len(tokens) - overlap, 1), step)
    return [" ".join(tokens[s : s + words]) for s in starts]


def fingerprint_text(text: str) -> bytes | None:
    """A digest of a text's words, lower case, without punctuation: equal for exact and near duplicates
    (16 bytes a passage, whatever its length); None for a text without a word (never a duplicate)."""
    import hashlib

    words = " ".join(re.findall(r"\w+", text.lower()))
    return hashlib.blake2b(words.encode(), digest_size=16).digest() if words else None
