"""Your own corpus (`layout: plain`, issue 24 item 1): SciFact's abstracts as a plain JSONL file with no
queries and no qrels, and a folder of Markdown files, ingested into passages; long documents cut by the
documented rule, exact and near duplicates dropped and counted, bad records rejected with file, line
and reason."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq

from conftest import write_lines
from utilrag.data import ingest
from utilrag.data.plain import passages
from utilrag.data.tables import read_table
from utilrag.store import read_manifest


def _rejects(out: Path) -> dict:
    rows = pq.read_table(out / "rejects.parquet").to_pylist()
    return {(r["file"].rsplit("/", 1)[-1], r["line"]): r["reason"] for r in rows}


def test_the_cutting_rule():
    text = " ".join(f"w{i}" for i in range(600))
    cut = passages(text, 200, 50)  # windows of 200 words starting every 150
    assert [p.split()[0] for p in cut] == ["w0", "w150", "w300", "w450"]
    assert [len(p.split()) for p in cut] == [200, 200, 200, 150]
    assert passages("a  short\n text", 200, 50) == ["a short text"]


def test_scifact_abstracts_as_a_plain_jsonl_file(ray_local, shared_datasets, tmp_path, make_config):
    with gzip.open(shared_datasets / "scifact" / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(next(f)) for _ in range(200)]
    records = [{"id": d["_id"], "title": d["title"], "text": d["text"], "year": 2020} for d in docs]
    long_text = " ".join(f"word{i}" for i in range(600))
    lines = [json.dumps(r) for r in records] + [
        json.dumps({"id": "copy", "text": records[0]["text"]}),  # line 201: an exact duplicate's text
        json.dumps({"id": "near", "text": records[1]["text"].upper().replace(".", "!")}),  # 202: near
        json.dumps({"id": "long", "title": "Long", "text": long_text}),  # 203: four passages
        json.dumps({"title": "no id", "text": "x"}),  # 204
        json.dumps({"id": "empty", "text": "   "}),  # 205
        json.dumps({"id": records[2]["id"], "text": "other words"}),  # 206: a reused id
        "{not json",  # 207
        json.dumps({"id": "a#1", "text": "a passage id"}),  # 208
    ]
    write_lines(tmp_path / "mine" / "docs.jsonl", lines)
    cfg = make_config(
        {
            "ingest": {
                "reject_threshold": 0.05,
                "datasets": [{"name": "mine", "path": str(tmp_path / "mine"), "layout": "plain"}],
            }
        }
    )
    result = ingest(cfg)["mine"]
    out = Path(result.output)
    corpus = read_table(out / "corpus")
    ids = corpus.column("doc_id").to_pylist()
    expected = []
    for r in records:  # SciFact abstracts: many over 200 words, cut into passages D#0, D#1, ...
        n = len(passages(r["text"], 200, 50))
        expected += [r["id"]] if n == 1 else [f"{r['id']}#{k}" for k in range(n)]
    assert 200 < len(expected) < 400
    assert ids == expected + ["long#0", "long#1", "long#2", "long#3"]
    assert corpus.column("text").to_pylist()[len(expected) + 1].split()[0] == "word150"
    assert not (out / "queries").exists() and not (out / "qrels").exists()
    # a duplicate's passages are dropped one by one, each naming the passage it repeats (the dict keeps
    # the last of a line's)
    copies = {k: len(passages(records[k]["text"], 200, 50)) for k in (0, 1)}
    first = {k: records[k]["id"] + (f"#{copies[k] - 1}" if copies[k] > 1 else "") for k in (0, 1)}
    assert _rejects(out) == {
        ("docs.jsonl", 201): f"duplicate text of {first[0]}",
        ("docs.jsonl", 202): f"duplicate text of {first[1]}",
        ("docs.jsonl", 204): "empty or missing id",
        ("docs.jsonl", 205): "empty text",
        ("docs.jsonl", 206): f"duplicate doc id {records[2]['id']} (different content)",
        ("docs.jsonl", 207): "malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        ("docs.jsonl", 208): "id 'a#1' contains '#', which marks a passage of a document",
    }
    manifest = read_manifest(out)
    assert manifest["rejected"] == {"corpus": 5}  # the two duplicates are dropped, not rejected
    assert manifest["notes"]["corpus"] == {"duplicate text dropped": copies[0] + copies[1]}
    assert manifest["layout"] == "plain"

    again = ingest(cfg)["mine"]  # unchanged: reused
    assert again.reused
    cut = make_config(
        {
            "ingest": {
                "reject_threshold": 0.05,
                "datasets": [{"name": "mine", "path": str(tmp_path / "mine"), "layout": "plain", "passage_words": 300}],
            }
        }
    )
    recut = ingest(cut)["mine"]  # another cutting rule: ingested afresh
    assert not recut.reused
    assert len(passages(long_text, 300, 50)) == 3  # windows 0-299, 250-549, 500-599
    assert read_table(Path(recut.output) / "corpus").column("doc_id").to_pylist()[-3:] == ["long#0", "long#1", "long#2"]


def test_a_folder_of_markdown_files(ray_local, tmp_path, make_config):
    root = tmp_path / "notes"
    write_lines(root / "guide" / "setup.md", ["# Setting up", "", "Install the package and run it."])
    write_lines(root / "My Notes.md", ["Some notes about " + " ".join(["retrieval"] * 250)])
    write_lines(root / "plain.txt", ["A plain text document."])
    (root / "image.md").write_bytes(b"\x89PNG\x00\x00binary")
    with open(root / "huge.txt", "wb") as f:  # 50 MB (sparse): rejected by its size, never read
        f.truncate(50 * 2**20)
    (root / "ignored.pdf").write_bytes(b"%PDF")
    write_lines(root / "queries.txt", ["how do I set it up", "", "what about retrieval"])
    cfg = make_config(
        {"ingest": {"reject_threshold": 1.0, "datasets": [{"name": "notes", "path": str(root), "layout": "plain"}]}}
    )
    result = ingest(cfg)["notes"]
    out = Path(result.output)
    corpus = read_table(out / "corpus").to_pylist()
    by_id = {r["doc_id"]: r for r in corpus}
    assert set(by_id) == {"guide/setup.md", "My%20Notes.md#0", "My%20Notes.md#1", "plain.txt"}
    assert by_id["guide/setup.md"]["title"] == "Setting up"
    assert by_id["guide/setup.md"]["text"] == "# Setting up Install the package and run it."
    queries = read_table(out / "queries").to_pylist()
    assert [(q["query_id"], q["text"]) for q in queries] == [
        ("q1", "how do I set it up"),
        ("q3", "what about retrieval"),
    ]
    # searchable: the BM25 stage over the passages, with the folder's own queries (no qrels: split "all")
    from utilrag.config import BM25Config
    from utilrag.index.bm25 import run_bm25

    folder, _ = run_bm25(cfg, BM25Config(dataset="notes", split="all", k=2, stemmer=None))
    run = pq.read_table(Path(folder) / "run.parquet").to_pylist()
    top = {r["query_id"]: r["doc_id"] for r in run if r["rank"] == 1}
    assert top == {"q1": "guide/setup.md", "q3": "My%20Notes.md#0"}
    # pools without human positives: each query keeps the run's top passages (no qrels: kept by default)
    from utilrag.config import PoolsConfig
    from utilrag.data import run_pools

    folder, _ = run_pools(cfg, PoolsConfig(dataset="notes", split="all", size=3))
    pools = pq.read_table(Path(folder) / "pools.parquet").to_pylist()
    assert {p["query_id"] for p in pools} == {"q1", "q3"}
    assert {p["source"] for p in pools} == {"bm25s"} and {p["human_grade"] for p in pools} == {None}
    stats = read_manifest(folder)["stats"]
    assert stats["no_positive"] == stats["unlabeled_kept"] == 2
    # a passage BM25 scored at all is a candidate: here fewer than 3 per query (short pools, counted)
    matched = {(r["query_id"], r["doc_id"]) for r in run}
    assert {(p["query_id"], p["doc_id"]) for p in pools} <= matched and stats["short_pool"] == 2
    assert _rejects(out) == {
        ("image.md", 1): "binary file (NUL bytes), not text",
        ("huge.txt", 1): "document of 50.0 MB, over max_document_mb 10.0",
        ("queries.txt", 2): "empty line",
    }


def test_csv_with_a_byte_order_mark_and_a_long_field_and_a_folder_on_s3(s3_env, tmp_path):
    """Excel's CSV export (a BOM before the header) and a 200 KB document in one field are read; a plain
    corpus on object storage given with a trailing slash lists its files under their own URIs."""
    from conftest import S3_BUCKET
    from utilrag import store
    from utilrag.config import DatasetConfig
    from utilrag.data.formats import parse_file
    from utilrag.data.registry import resolve

    long_text = "word " * 40_000
    csv_file = tmp_path / "docs.csv"
    csv_file.write_bytes(b"\xef\xbb\xbfid,title,text\n" + f"a,A,short text\nb,B,{long_text}\n".encode())
    ctx = {"passage_words": 200, "passage_overlap": 50, "max_document_mb": 10.0, "root": str(tmp_path)}
    rows = [r for t in parse_file(str(csv_file), "corpus", "plain_corpus", ctx) for r in t.to_pylist()]
    assert [r["_reason"] for r in rows if r["_reason"]] == []
    assert (
        rows[0]["doc_id"] == "a" and rows[1]["doc_id"] == "b#0" and len(rows) == 1 + len(passages(long_text, 200, 50))
    )

    root = f"s3://{S3_BUCKET}/plain/notes"
    store.write_text(f"{root}/guide/setup.md", "# Setup\nInstall it.")
    store.write_text(f"{root}/queries.txt", "how to install\n")
    resolved = resolve(DatasetConfig(name="notes", path=root + "/", layout="plain"), "")
    assert sorted((j.uri, j.table) for j in resolved.jobs) == [
        (f"{root}/guide/setup.md", "corpus"),
        (f"{root}/queries.txt", "queries"),
    ]
    [table] = parse_file(f"{root}/guide/setup.md", "corpus", "plain_corpus", resolved.jobs[0].ctx)
    assert table.to_pylist()[0]["doc_id"] == "guide/setup.md"
