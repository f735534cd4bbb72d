"""The Parquet tables every stage reads and writes, and small helpers around them.

Ids are strings everywhere (MS MARCO ids are integers, BEIR ids are not).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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
}

REJECTS_SCHEMA = pa.schema(
    [("table", pa.string()), ("file", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)

# Per-row provenance carried next to the table's columns between parse and validation.
PROVENANCE = [("_file", pa.string()), ("_line", pa.int64()), ("_reason", pa.string()), ("_raw", pa.string())]


def parse_schema(table: str) -> pa.Schema:
    return pa.schema(list(SCHEMAS[table]) + [pa.field(n, t) for n, t in PROVENANCE])


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read one table written by a stage (a folder of Parquet parts, or one file)."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no Parquet files in {path}")
        return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])
    return pq.read_table(path, columns=columns)


class ParquetParts:
    """Writes a table as part-00000.parquet, part-00001.parquet, … of at most rows_per_file rows."""

    def __init__(self, folder: Path, schema: pa.Schema, rows_per_file: int):
        self.folder, self.schema, self.rows_per_file = Path(folder), schema, rows_per_file
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("part-*.parquet"):
            old.unlink()
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        self.files = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        while table.num_rows:
            if self._writer is None:
                name = self.folder / f"part-{self.files:05d}.parquet"
                self._writer = pq.ParquetWriter(name, self.schema, compression="zstd")
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
            pq.write_table(self.schema.empty_table(), self.folder / "part-00000.parquet")
            self.files = 1


# --------------------------------------------------------------------------- manifests
def code_version() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from utilrag import __version__

    return __version__


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_manifest(folder: Path, **fields) -> dict:
    manifest = {"code_version": code_version(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def require_manifest(folder: Path, what: str) -> dict:
    """A stage input's manifest, or one line saying which input is missing and what makes it."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise MissingInputError(
            f"{what}: no manifest at {Path(folder) / 'manifest.json'} (run the stage that makes it)"
        )
    return manifest


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
