"""`utilrag upload` on the S3-compatible server: a registered dataset, a local file tree and a model each
copied once, and each override it prints read back the way the stages read it (the registry resolves
the dataset under the new data_root, the annotation stages the model from the bucket)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import S3_BUCKET, write_lines
from utilrag import store
from utilrag.cli import main

TO = f"s3://{S3_BUCKET}/upload"


def _override(out: str, key: str) -> str:
    (value,) = re.findall(rf"^  {re.escape(key)}=(\S+)", out, re.M)
    return value


def test_a_registered_dataset_lands_under_a_data_root_the_registry_reads(s3_env, shared_datasets, capsys):
    from utilrag.config import DatasetConfig
    from utilrag.data.registry import resolve

    assert main(["upload", "scifact", "--to", TO, "--data-root", str(shared_datasets)]) == 0
    out = capsys.readouterr().out
    data_root = _override(out, "data_root")
    assert data_root == f"{TO}/datasets"
    local = sorted(
        p.relative_to(shared_datasets / "scifact").as_posix()
        for p in (shared_datasets / "scifact").rglob("*")
        if p.is_file()
    )
    assert f"[upload] dataset: {len(local)} files" in out
    resolved = resolve(DatasetConfig(name="scifact"), data_root, allow_download=False)
    assert resolved.root == f"{TO}/datasets/scifact" and {j.table for j in resolved.jobs} >= {
        "corpus",
        "queries",
        "qrels",
    }
    size = (
        store.filesystem(f"{TO}/datasets/scifact/corpus.jsonl.gz")[0]
        .get_file_info(f"{S3_BUCKET}/upload/datasets/scifact/corpus.jsonl.gz")
        .size
    )
    assert size == (shared_datasets / "scifact" / "corpus.jsonl.gz").stat().st_size


def test_a_local_tree_and_a_model(s3_env, tmp_path, capsys, monkeypatch):
    from utilrag.annotate.engine import resolve_llm, stage_model
    from utilrag.config import DatasetConfig
    from utilrag.data.registry import resolve

    corpus = tmp_path / "my-corpus"
    write_lines(corpus / "collection.tsv", [f"{i}\tpassage {i}" for i in range(5)])
    write_lines(corpus / "queries.train.tsv", ["q1\twhat"])
    write_lines(corpus / "qrels.train.tsv", ["q1 0 3 1"])
    assert main(["upload", str(corpus), "--to", TO]) == 0
    out = capsys.readouterr().out
    path = _override(out, "ingest.datasets.N.path")
    assert path == f"{TO}/datasets/my-corpus"
    assert {j.table for j in resolve(DatasetConfig(name="mine", path=path, layout="msmarco"), "").jobs} == {
        "corpus",
        "queries",
        "qrels",
    }

    monkeypatch.setenv("UTILRAG_CACHE", str(tmp_path / "cache"))  # this "node's" copy of the model
    # a registered set's copy made elsewhere (no download here): under the data root, by its name
    pool = tmp_path / "export"
    write_lines(
        pool / "train.jsonl",
        [json.dumps({"query_id": "1", "query": "q", "positive_passages": [], "negative_passages": []})],
    )
    assert main(["upload", str(pool), "--to", TO, "--name", "tevatron-msmarco"]) == 0
    assert _override(capsys.readouterr().out, "data_root") == f"{TO}/datasets"
    assert store.exists(f"{TO}/datasets/tevatron-msmarco/train.jsonl")

    model = tmp_path / "tiny-llm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (model / "model.safetensors").write_bytes(b"w" * 100_000)
    assert main(["upload", str(model), "--to", TO]) == 0
    out = capsys.readouterr().out
    uri = _override(out, "annotate.model")
    assert uri == _override(out, "rag.model") == f"{TO}/models/tiny-llm"
    assert resolve_llm(uri) == uri  # the annotation takes it as it is, and each node copies it once:
    staged = Path(stage_model(uri))
    assert (staged / "model.safetensors").read_bytes() == b"w" * 100_000


def test_bad_sources_and_destinations_are_one_line(s3_env, tmp_path, capsys):
    assert main(["upload", str(tmp_path / "nothing-here"), "--to", TO]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"utilrag: error: upload {str(tmp_path / 'nothing-here')!r}: no such folder, not a registered dataset "
        "and not a model name (owner/name)"
    ]
    (tmp_path / "x").mkdir()
    assert main(["upload", str(tmp_path / "x"), "--to", "ftp://host/x"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("utilrag: error: ftp://host/x: cannot open it")


def test_to_a_shared_path(tmp_path, capsys):
    src = tmp_path / "src"
    write_lines(src / "a" / "b.txt", ["x"])
    shared = tmp_path / "shared"
    assert main(["upload", str(src), "--to", str(shared), "--name", "corpus"]) == 0
    assert (shared / "datasets" / "corpus" / "a" / "b.txt").read_text() == "x\n"
    assert not list((shared / "datasets" / "corpus" / "a").glob("*.tmp-*"))
    assert "data_root" not in capsys.readouterr().out  # a file tree: its own path, not a data root
