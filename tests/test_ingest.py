"""Every reader on the real files, and on broken inputs with the rejects written."""

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_lines
from utilrag.data import IngestError, ingest, registry
from utilrag.data.formats import parse_file
from utilrag.data.tables import read_table
from utilrag.store import read_manifest


def _rejects(out):
    return pq.read_table(out / "rejects.parquet").to_pylist()


def test_real_scifact_and_dl19(ray_local, shared_datasets, make_config, capsys):
    cfg = make_config(
        {"data_root": str(shared_datasets), "ingest": {"datasets": [{"name": "scifact"}, {"name": "trec-dl-2019"}]}}
    )
    results = ingest(cfg)
    sf, dl = Path(results["scifact"].output), Path(results["trec-dl-2019"].output)
    assert read_table(sf / "corpus").num_rows == 5183
    assert read_table(sf / "queries").num_rows == 1109
    qrels = read_table(sf / "qrels").to_pandas()
    assert qrels.groupby("split").size().to_dict() == {"test": 339, "train": 919}
    assert results["scifact"].rejected == 0 and results["trec-dl-2019"].rejected == 0

    assert read_table(dl / "corpus").num_rows == 9383
    assert read_table(dl / "queries").num_rows == 43
    assert read_table(dl / "qrels").num_rows == 9260  # judged passages outside the pool are kept…
    manifest = read_manifest(dl)
    assert manifest["notes"]["qrels"] == {"judged doc outside the corpus (kept)": 5647}  # …and counted
    assert manifest["relevance_threshold"] == 2
    runs = read_table(dl / "runs").to_pandas()
    assert sorted(runs["run"].unique()) == ["bm25", "bm25-rm3", "splade-pp", "tasb"]
    assert runs.groupby("run")["query_id"].nunique().eq(43).all()
    doc = read_table(dl / "corpus").to_pandas().set_index("doc_id").loc["1722"]
    assert doc["text"].startswith("Fields of Anthropology.")

    # A second ingest of unchanged inputs reuses the output.
    capsys.readouterr()
    again = ingest(cfg)
    assert again["scifact"].reused and again["trec-dl-2019"].reused
    assert "inputs unchanged" in capsys.readouterr().out


def test_broken_msmarco_inputs_are_rejected_with_file_line_reason(ray_local, tmp_path, make_config):
    root = tmp_path / "broken"
    write_lines(
        root / "collection.tsv.gz",
        [
            "1\tfirst passage",
            "2\tsecond passage",
            "3\tthird\textra\tcolumn",
            b"4\tbad \xff utf8",
            "5\t   ",
            "1\tfirst passage again",
        ],
        compress=True,
    )
    write_lines(root / "queries.tsv", ["10\twhat is one", "11", "12\tthird query"])
    write_lines(root / "qrels.txt", ["10 0 1 2", "10 0 99 1", "77 0 1 1", "10 0 2 x", "10 0 1 2"])
    write_lines(root / "runs" / "r.trec", ["10 Q0 1 1 3.5 r", "10 Q0 2 2 1.0 r", "10 Q0 404 3 0.5 r", "10 Q0 2 x"])
    cfg = make_config(
        {"ingest": {"reject_threshold": 1.0, "datasets": [{"name": "broken", "path": str(root), "layout": "msmarco"}]}}
    )
    result = ingest(cfg)["broken"]
    out = Path(result.output)
    assert read_table(out / "corpus").column("doc_id").to_pylist() == ["1", "2"]
    assert read_table(out / "queries").column("query_id").to_pylist() == ["10", "12"]
    assert read_table(out / "qrels").to_pylist() == [{"query_id": "10", "doc_id": "1", "grade": 2, "split": "default"}]
    assert read_table(out / "runs").num_rows == 2
    got = {(r["table"], r["file"].rsplit("/", 1)[-1], r["line"]): r["reason"] for r in _rejects(out)}
    assert got == {
        ("corpus", "collection.tsv.gz", 3): "expected 2 or 3 columns, found 4",
        ("corpus", "collection.tsv.gz", 4): "invalid UTF-8 at byte 6",
        ("corpus", "collection.tsv.gz", 5): "empty passage text",
        ("corpus", "collection.tsv.gz", 6): "duplicate doc id 1 (different content)",
        ("queries", "queries.tsv", 2): "expected 2 columns, found 1",
        ("qrels", "qrels.txt", 2): "unknown doc id 99",
        ("qrels", "qrels.txt", 3): "unknown query id 77",
        ("qrels", "qrels.txt", 4): "grade 'x' is not an integer",
        ("qrels", "qrels.txt", 5): "duplicate qrels row for query 10 doc 1",
        ("runs", "r.trec", 3): "unknown doc id 404",
        ("runs", "r.trec", 4): "expected 6 columns, found 4",
    }
    assert result.rejected == 11
    manifest = read_manifest(out)
    assert manifest["rejected"] == {"corpus": 4, "queries": 1, "qrels": 4, "runs": 2}


def test_reject_threshold_fails_the_ingest_with_a_clear_message(ray_local, tmp_path, make_config):
    root = tmp_path / "mostly-ok"
    write_lines(root / "collection.tsv", [f"{i}\tpassage {i}" for i in range(999)] + ["oops"])
    write_lines(root / "queries.tsv", ["1\tq"])
    cfg = make_config({"ingest": {"datasets": [{"name": "m", "path": str(root), "layout": "msmarco"}]}})
    with pytest.raises(
        IngestError, match=r"m: 1 of 1,001 rows rejected \(0\.100%\) exceeds reject_threshold 0\.090%"
    ) as e:
        cfg.ingest.reject_threshold = 0.0009
        ingest(cfg)
    assert "rejects.parquet" in str(e.value)
    assert _rejects(cfg_out := (tmp_path / "out" / "ingest" / "m"))[0]["line"] == 1000
    assert read_manifest(cfg_out)["status"] == "failed"
    cfg.ingest.reject_threshold = 0.001  # at the threshold it passes, and the failed output is not reused
    assert ingest(cfg)["m"].rejected == 1


def test_truncated_gzip_keeps_what_was_read_and_rejects_the_rest(tmp_path):
    lines = [f'{{"_id": "{i}", "title": "", "text": "doc {i} ' + "word " * 50 + '"}' for i in range(2000)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    table = next(iter(parse_file(str(path), "corpus", "beir_corpus", {}, batch_rows=10**6)))
    bad = table.filter(table.column("_reason").is_valid()).to_pylist()
    good = table.num_rows - len(bad)
    assert 0 < good < 2000
    assert len(bad) == 1 and bad[0]["_reason"].startswith(f"truncated or corrupt gzip after line {good}")


def test_broken_beir_jsonl(ray_local, tmp_path, make_config):
    root = tmp_path / "beirish"
    write_lines(
        root / "corpus.jsonl",
        [
            json.dumps({"_id": "d1", "title": "T", "text": "alpha"}),
            '{"_id": "d2", "text": "unterminated',
            json.dumps({"_id": "d3", "title": "T"}),
            json.dumps(["not", "an", "object"]),
            json.dumps({"_id": "d 4", "text": "space in id"}),
        ],
    )
    write_lines(root / "queries.jsonl", [json.dumps({"_id": "q1", "text": "alpha?"}), ""])
    write_lines(root / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td2\t1"])
    cfg = make_config({"ingest": {"reject_threshold": 1.0, "datasets": [{"name": "b", "path": str(root)}]}})
    out = Path(ingest(cfg)["b"].output)
    reasons = {(r["table"], r["line"]): r["reason"] for r in _rejects(out)}
    assert reasons[("corpus", 2)].startswith("malformed JSON")
    assert reasons[("corpus", 3)] == "text is not a string"
    assert reasons[("corpus", 4)] == "JSON line is not an object"
    assert reasons[("corpus", 5)] == "_id 'd 4' contains whitespace"
    assert reasons[("queries", 2)] == "empty line"
    assert reasons[("qrels", 3)] == "unknown doc id d2"  # header row (line 1) is not a reject
    assert read_table(out / "qrels").num_rows == 1


def test_tevatron_pools_are_read_as_given(ray_local, tmp_path, make_config):
    def passage(i):
        return {"docid": str(i), "title": f"title {i}" if i == 1 else "", "text": f"passage {i}"}

    rows = [
        {
            "query_id": "q1",
            "query": "first?",
            "positive_passages": [passage(1)],
            "negative_passages": [passage(i) for i in (5, 6, 7)],
        },
        {
            "query_id": "q2",
            "query": "second?",
            "positive_passages": [passage(2)],
            "negative_passages": [passage(i) for i in (5, 8)],
        },  # passage 5 repeats: merged, not rejected
        {"query_id": "q3", "query": "third?"},
    ]
    write_lines(tmp_path / "tev" / "train.jsonl.gz", [json.dumps(r) for r in rows], compress=True)
    cfg = make_config(
        {
            "ingest": {
                "reject_threshold": 1.0,
                "datasets": [{"name": "tev", "path": str(tmp_path / "tev"), "layout": "tevatron"}],
            }
        }
    )
    out = Path(ingest(cfg)["tev"].output)
    assert read_table(out / "corpus").num_rows == 6
    assert read_table(out / "corpus").to_pylist()[0]["title"] == "title 1"  # kept: not the registered name
    # tevatron-msmarco drops titles by default (the evaluation collection has none): text alone
    assert registry.REGISTRY["tevatron-msmarco"].titles is False
    untitled = make_config(
        {
            "ingest": {
                "reject_threshold": 1.0,
                "datasets": [{"name": "tev", "path": str(tmp_path / "tev"), "titles": False}],
            }
        }
    )
    corpus = read_table(ingest(untitled)["tev"].output + "/corpus").to_pylist()
    assert corpus[0] == {"doc_id": "1", "title": "", "text": "passage 1"}
    out = Path(ingest(cfg)["tev"].output)  # the titled ingest again (another fingerprint)
    pools = read_table(out / "pools").to_pylist()
    assert [(p["query_id"], p["doc_id"], p["position"], p["source"]) for p in pools[:4]] == [
        ("q1", "1", 0, "human"),
        ("q1", "5", 1, "tevatron"),
        ("q1", "6", 2, "tevatron"),
        ("q1", "7", 3, "tevatron"),
    ]
    assert read_table(out / "qrels").to_pylist()[0] == {"query_id": "q1", "doc_id": "1", "grade": 1, "split": "train"}
    assert {r["reason"] for r in _rejects(out)} == {"missing key 'positive_passages'"}
    assert read_manifest(out)["notes"]["corpus"] == {"identical duplicate merged": 1}
    # The pools stage shuffles the given pools per query and records the seed.
    from utilrag.data import run_pools
    from utilrag.store import Store

    cfg = make_config(
        {**cfg.model_dump(include={"ingest"}), "pools": [{"dataset": "tev", "split": "train", "seed": 3}]}
    )
    folder, _ = run_pools(cfg, cfg.pools[0])
    assert read_manifest(folder)["shuffle"]["seed"] == 3
    shuffled = read_table(Store(cfg.output_dir).pools("tev", "train") + "/pools.parquet").to_pylist()
    q1 = [p["doc_id"] for p in sorted((p for p in shuffled if p["query_id"] == "q1"), key=lambda p: p["position"])]
    assert sorted(q1) == ["1", "5", "6", "7"] and q1 != ["1", "5", "6", "7"]


def test_missing_dataset_offline_says_which_files_go_where(tmp_path, make_config):
    from utilrag.data import DatasetError

    cfg = make_config(
        {"data_root": str(tmp_path / "empty"), "ingest": {"download": False, "datasets": [{"name": "nfcorpus"}]}}
    )
    with pytest.raises(
        DatasetError,
        match=r"'nfcorpus' is not at .*empty/nfcorpus .*corpus\.jsonl, queries\.jsonl, "
        r"qrels/<split>\.tsv .*BEIR/datasets/nfcorpus\.zip",
    ):
        ingest(cfg)


def test_msmarco_tab_qrels_and_tevatron_style_collection(tmp_path):
    qrels = write_lines(tmp_path / "qrels.train.tsv", ["1185869\t0\t0\t1", "1185868\t0\t16\t1"])
    rows = next(iter(parse_file(str(qrels), "qrels", "trec_qrels", {"split": "train"}))).to_pylist()
    assert [(r["query_id"], r["doc_id"], r["grade"], r["_reason"]) for r in rows] == [
        ("1185869", "0", 1, None),
        ("1185868", "16", 1, None),
    ]
    corpus = write_lines(tmp_path / "corpus.tsv", ["7\tA title\tthe passage text"])
    row = next(iter(parse_file(str(corpus), "corpus", "msmarco_collection", {}))).to_pylist()[0]
    assert (row["doc_id"], row["title"], row["text"]) == ("7", "A title", "the passage text")


def test_lost_data_is_always_in_the_summary_and_rejects_keep_the_line_as_read(ray_local, tmp_path, make_config, capsys):
    """A truncated gzip is one reject among many commoner ones: the console summary still names it.
    A row rejected by a later check (unknown query) keeps its original line, not a rebuilt one."""
    bad = ["x", "x", "", "", b"\xff\xfe\t1", b"\xff\xfe\t2", "7\t", "8\t", "9\ta\tb\tc", "10\ta\tb\tc"]
    docs = [f"{i}\tdoc {i} " + "word " * 40 for i in range(20, 3000)]
    data = gzip.compress(b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\n" for ln in bad + docs))
    root = tmp_path / "m"
    root.mkdir()
    (root / "collection.tsv.gz").write_bytes(data[: len(data) // 2])
    write_lines(root / "queries.tsv", ["1\tq"])
    write_lines(root / "qrels.tsv", ["1 0 20 1", "q9   0  21   1"])
    cfg = make_config(
        {"ingest": {"reject_threshold": 1.0, "datasets": [{"name": "m", "path": str(root), "layout": "msmarco"}]}}
    )
    capsys.readouterr()
    ingest(cfg)
    summary = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[ingest] m/corpus: ")][-1]
    assert summary.startswith("[ingest] m/corpus: 1 truncated; 4 expected; 2 ") and summary.count(";") == 4, summary
    rejects = _rejects(tmp_path / "out" / "ingest" / "m")
    unknown = [r for r in rejects if r["table"] == "qrels"]
    assert [(r["reason"].split(" ")[0:3], r["raw"]) for r in unknown] == [
        (["unknown", "query", "id"], "q9   0  21   1")
    ]


def test_registry_has_the_papers_evaluation_sets(tmp_path, make_config):
    """TREC DL 2020 by name (official NIST qrels and topics) and the paper's 14 BEIR sets, with
    CQADupStack as its 12 forums and ArguAna / Quora marked for self-hit removal."""
    from utilrag.data import DatasetError
    from utilrag.data.registry import BEIR_NAMES, REGISTRY

    assert len(BEIR_NAMES) == 14 and "msmarco" not in BEIR_NAMES
    dl20 = REGISTRY["trec-dl-2020"]
    assert dl20.relevance_threshold == 2 and [t for _, t in dl20.downloads] == ["", "qrels.txt", "queries.tsv.gz"]
    assert "2020qrels-pass.txt" in dl20.downloads[1][0] and "test2020-queries" in dl20.downloads[2][0]
    assert {n for n, r in REGISTRY.items() if r.ignore_identical_ids} == {"arguana", "quora"}
    assert sum(n.startswith("cqadupstack-") for n in REGISTRY) == 12
    cfg = make_config(
        {"data_root": str(tmp_path), "ingest": {"download": False, "datasets": [{"name": "trec-dl-2020"}]}}
    )
    with pytest.raises(DatasetError, match=r"'trec-dl-2020' is not at .*2020qrels-pass\.txt"):
        ingest(cfg)
