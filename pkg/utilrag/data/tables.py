"""The Parquet tables every stage reads and writes, and small helpers around them.

Ids are strings everywhere (MS MARCO ids are integers, BEIR ids are not).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from utilrag import store
from utilrag.errors import MissingInputError

SCHEMAS: dict[str, pa.Schema] = {
    "corpus": pa.schema([("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())]),
    "queries": pa.schema([("query_id", pa.string()), ("text", pa.string())]),
    # split: the qrels file it came from (train/dev/test); grade: the judged relevance.
    "qrels": pa.schema(
        [("query_id", pa.string()), ("doc_id", pa.string()), ("grade", pa.int32()), ("split", pa.string())]
    ),
    # run: the run's name (its file stem); rank from 1.
    "runs": pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("rank", pa.int32()),
            ("score", pa.float64()),
            ("run", pa.string()),
        ]
    ),
    # source: human (a judged positive), or where the negative came from (a run name, bm25,
    # tevatron); human_grade: the qrels grade, null when unjudged.
    "pools": pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("position", pa.int32()),
            ("source", pa.string()),
            ("human_grade", pa.int32()),
        ]
    ),
    # A question-answering set (RAG): gold answers, and the gold passages where the set has them.
    "qa": pa.schema(
        [
            ("query_id", pa.string()),
            ("question", pa.string()),
            ("answers", pa.list_(pa.string())),
            ("gold_doc_ids", pa.list_(pa.string())),
        ]
    ),
}

REJECTS_SCHEMA = pa.schema(
    [("table", pa.string()), ("file", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)

# Per-row provenance carried next to the table's columns between parse and validation.
PROVENANCE = [("_file", pa.string()), ("_line", pa.int64()), ("_reason", pa.string()), ("_raw", pa.string())]


def parse_schema(table: str) -> pa.Schema:
    return pa.schema(list(SCHEMAS[table]) + [pa.field(n, t) for n, t in PROVENANCE])


def read_table(location: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read one table written by a stage (a folder of Parquet parts, or one file; local or URI)."""
    fs, path = store.filesystem(str(location))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        parts = sorted(
            i.path
            for i in fs.get_file_info(pafs.FileSelector(path))
            if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        )
        if not parts:
            raise MissingInputError(f"no Parquet files in {location}")
        return pa.concat_tables([pq.read_table(p, columns=columns, filesystem=fs) for p in parts])
    if info.type == pafs.FileType.NotFound:
        raise MissingInputError(f"{location}: not found")
    return pq.read_table(path, columns=columns, filesystem=fs)


def read_rows(location: str | os.PathLike, column: str, values: set[str], columns: list[str]) -> pa.Table:
    """The rows of a stage's table whose ``column`` is in ``values``, streamed a batch at a time: only the
    matches are held (a 21M-passage corpus is never gathered to pick a few thousand passages)."""
    fs, path = store.filesystem(str(location))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise MissingInputError(f"{location}: not found")
    files = (
        sorted(
            i.path
            for i in fs.get_file_info(pafs.FileSelector(path))
            if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        )
        if info.type == pafs.FileType.Directory
        else [path]
    )
    wanted = pa.array(sorted(values), pa.string())
    found = []
    for name in files:
        with fs.open_input_file(name) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536, columns=columns):
                keep = pc.is_in(pc.cast(batch.column(column), pa.string()), value_set=wanted)
                if pc.any(keep).as_py():
                    found.append(pa.Table.from_batches([batch]).filter(keep))
    return pa.concat_tables(found) if found else pa.table({c: pa.array([], pa.string()) for c in columns})


def write_table(table: pa.Table, location: str | os.PathLike) -> None:
    fs, path = store.filesystem(str(location))
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs)


class ParquetParts:
    """Writes a table as part-00000.parquet, part-00001.parquet, … of at most rows_per_file rows."""

    def __init__(self, folder: str | os.PathLike, schema: pa.Schema, rows_per_file: int):
        self.schema, self.rows_per_file = schema, rows_per_file
        self.fs, self.folder = store.filesystem(str(folder))
        self.fs.create_dir(self.folder, recursive=True)
        for old in self.fs.get_file_info(pafs.FileSelector(self.folder)):
            if posixpath.basename(old.path).startswith("part-"):
                self.fs.delete_file(old.path)
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self.files = 0
        self.rows = 0

    def _name(self, i: int) -> str:
        return posixpath.join(self.folder, f"part-{i:05d}.parquet")

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        while table.num_rows:
            if self._writer is None:
                self._writer = pq.ParquetWriter(
                    self._name(self.files), self.schema, compression="zstd", filesystem=self.fs
                )
                self.files += 1
                self._in_file = 0
            take = min(table.num_rows, self.rows_per_file - self._in_file)
            self._writer.write_table(table.slice(0, take))
            self._in_file += take
            self.rows += take
            table = table.slice(take)
            if self._in_file >= self.rows_per_file:
                self._writer.close()
                self._writer = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.files == 0:  # an empty table is still a readable table
            pq.write_table(self.schema.empty_table(), self._name(0), filesystem=self.fs)
            self.files = 1


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def heldout(document: str, percent: float, seed: int) -> bool:
    """Whether a document's questions are evaluation questions (a stable hash: the same documents for
    every sample size)."""
    digest = hashlib.sha1(f"{seed}:{document}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100 < percent
