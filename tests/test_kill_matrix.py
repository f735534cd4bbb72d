"""The kill matrix: every stage SIGKILLed at each point of the commit protocol during a rerun whose
setting changed, then rerun. The outputs must equal a clean run's (or the stage redoes itself); never
reuse of mismatched or partial output, never a traceback. A later stage refuses an interrupted input
with one line.

Points (``UTILRAG_FAULT_KILL=<stage>@<point>``, read in ``utilrag.store``): ``begin`` (old outputs
invalidated, nothing written), ``commit`` (new outputs staged), ``manifest`` (new outputs moved in
place, manifest not yet complete). The stages run as real CLI processes against one `ray start` head.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import TINY_TRAIN, start_ray_head, stop_cluster, wait_paused
from utilrag.paths import REPO_ROOT
from utilrag.store import Store, read_manifest

POINTS = ("begin", "commit", "manifest")


@pytest.fixture(scope="module")
def ray_head():
    temp_dir, gcs, _, env = start_ray_head()
    try:
        yield f"127.0.0.1:{gcs}", env
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    # stop_cluster stopped this cluster's processes, and only those (other tests' Ray stays up)
    time.sleep(1)
    assert not [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in c for c in (p.info["cmdline"] or []))]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    import random

    from conftest import WORDS, write_lines

    rng = random.Random(0)
    root = tmp_path_factory.mktemp("tiny")
    docs = [f"{d}\t" + " ".join(rng.choice(WORDS) for _ in range(12)) for d in range(80)]
    queries, qrels = [], []
    for q in range(16):
        pos = rng.sample(range(80), rng.choice([1, 2]))
        queries.append(f"q{q}\twhat about {' '.join(docs[pos[0]].split(chr(9))[1].split()[:4])}")
        qrels += [f"q{q} 0 {d} 1" for d in pos]
    write_lines(root / "collection.tsv", docs)
    write_lines(root / "queries.train.tsv", queries)
    write_lines(root / "qrels.train.tsv", qrels)
    return root


@pytest.fixture(scope="module")
def cli(ray_head, tiny_root, tiny_encoder, tmp_path_factory):
    address, env = ray_head
    out = tmp_path_factory.mktemp("kill") / "out"
    config = out.parent / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(out),
                "ray": {"address": address},
                "ingest": {"datasets": [{"name": "tiny", "path": str(tiny_root), "layout": "msmarco"}]},
                "pools": [{"dataset": "tiny", "split": "train", "size": 8}],
                "bm25": [{"dataset": "tiny", "split": "train", "k": 20}],
                "index": {
                    "batch_size": 64,
                    "shards": 1,
                    "k": 10,
                    "query_max_len": 16,
                    "passage_max_len": 32,
                    "targets": [{"dataset": "tiny", "split": "train"}],
                },
                "train": {**TINY_TRAIN, "model": tiny_encoder, "max_steps": 2, "name": "k"},
                "evaluate": {"metrics": ["nDCG@10"], "runs": [{"dataset": "tiny", "split": "train", "run": "bm25s"}]},
            }
        )
    )

    def command(stage: str, *overrides: str, **faults: str) -> tuple[list[str], dict]:
        run_env = {**env, "PYTHONPATH": str(REPO_ROOT / "pkg")}
        run_env.pop("UTILRAG_FAULT_KILL", None)
        run_env.pop("UTILRAG_FAULT_PAUSE", None)
        run_env.update(faults)
        return [sys.executable, "-m", "utilrag.cli", stage, "--config", str(config), *overrides], run_env

    def run(stage: str, *overrides: str, kill: str | None = None) -> subprocess.CompletedProcess:
        args, run_env = command(stage, *overrides, **({"UTILRAG_FAULT_KILL": kill} if kill else {}))
        proc = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=600)
        # Our process never prints a traceback. (Lines forwarded from Ray's own actors start with
        # "(Name pid=…)": Ray Train's PlacementGroupCleaner complains about the session's second
        # local Ray cluster on this machine, which is not ours to silence.)
        assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("Traceback")], proc.stderr[-3000:]
        if kill:
            assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc

    def start(stage: str, *overrides: str, pause: str, gate: Path) -> subprocess.Popen:
        """The stage in the background, held at ``pause`` (<stage>@<point>) until ``gate`` exists; its
        output in <gate>.log (a file, not a pipe nobody reads while it is held)."""
        args, run_env = command(stage, *overrides, UTILRAG_FAULT_PAUSE=f"{pause}={gate}")
        with open(f"{gate}.log", "w") as log:
            return subprocess.Popen(args, env=run_env, stdout=log, stderr=subprocess.STDOUT, text=True)

    run.store = Store(out)  # type: ignore[attr-defined]
    run.start = start  # type: ignore[attr-defined]
    return run


def _digest(folder: str, names: list[str]) -> str:
    """The content of a committed stage's table outputs (row order included)."""
    manifest = read_manifest(folder)
    assert manifest and manifest["status"] == "complete", manifest
    return _digest_unchecked(folder, names)


def _digest_unchecked(folder: str, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        path = Path(folder, name)
        if path.suffix == ".parquet" or path.is_dir():
            h.update(json.dumps(pq.read_table(path).to_pylist(), default=str).encode())
        else:
            h.update(path.read_bytes())
    return h.hexdigest()


def _matrix(cli, stage, point_stage, folder, names, setting, other, points=POINTS) -> None:
    """Clean run with `setting`; then per point: a rerun with `other` killed there (the folder is left
    marked running), and a rerun with `setting` that must end with the clean run's outputs. The run
    killed at `manifest` has moved its outputs in place: they must differ from the clean run's (the
    other setting really gives other output, so the equality after the rerun means something)."""
    ok = cli(stage, setting)
    assert ok.returncode == 0, ok.stderr[-2000:]
    clean = _digest(folder, names)
    assert "manifest" in points
    for point in points:
        cli(stage, other, kill=f"{point_stage}@{point}")
        assert read_manifest(folder)["status"] == "running"
        if point == "manifest":
            assert _digest_unchecked(folder, names) != clean, "the other setting's outputs are not in place"
        again = cli(stage, setting)
        assert again.returncode == 0, (point, again.stderr[-2000:])
        assert _digest(folder, names) == clean, point


def _summaries_read_back(root: str, stages: dict[str, str]) -> None:
    """Each committed folder's manifest reads as its stage's typed summary (the registry's), with the
    field that stage always fills (``stages``: stage -> field) not empty."""
    from utilrag.report.collect import discover
    from utilrag.stages import get_stage

    found = [f for f in discover(root) if f.committed is not None]
    assert {f.stage for f in found} >= set(stages), [f.rel for f in found]
    for f in found:
        summary = f.summary
        assert isinstance(summary, get_stage(f.stage).summary) and summary.code_version != "unknown"
        if f.stage in stages:
            filled = [getattr(summary, name) for name in stages[f.stage].split("|")]
            assert any(filled) and summary.wall() is not None, (f.rel, summary)


def _named_log(proc: subprocess.CompletedProcess, out: Path, stage: str) -> None:
    """The command names its log file at the end: under the run directory, holding the stage's lines."""
    named = [ln.split("log: ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith(f"[{stage}] log: ")]
    assert len(named) == 1 and Path(named[0]).parent == out / "logs", proc.stdout[-2000:]
    assert f"utilrag.{stage} INFO" in Path(named[0]).read_text(), named[0]


@pytest.mark.slow
def test_kill_matrix_ingest_pools_bm25_evaluate(cli):
    store = cli.store
    # ingest: a re-ingest with another reject threshold, killed; meanwhile later stages refuse it.
    ingest_dir = store.ingest("tiny")
    ok = cli("ingest", "ingest.reject_threshold=0.001")
    assert ok.returncode == 0, ok.stderr[-2000:]
    _named_log(ok, Path(store.root), "ingest")
    clean = _digest(ingest_dir, ["corpus", "queries", "qrels"])
    for point in ("begin", "manifest"):
        cli("ingest", "ingest.reject_threshold=0.5", kill=f"ingest@{point}")
        refused = cli("pools")
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines() == [
            "utilrag: error: dataset 'tiny': manifest status is 'running' (its stage was interrupted "
            f"or is still running) at {ingest_dir}/manifest.json (run the stage that makes it)"
        ]
        again = cli("ingest", "ingest.reject_threshold=0.001")
        assert again.returncode == 0 and "reusing" not in again.stdout, again.stdout
        assert _digest(ingest_dir, ["corpus", "queries", "qrels"]) == clean

    # pools: another seed, killed (the reported bug served the old seed's table).
    _matrix(cli, "pools", "pools", store.pools("tiny", "train"), ["pools.parquet"], "pools.0.seed=0", "pools.0.seed=7")

    # bm25: another k.
    _matrix(cli, "bm25", "bm25", store.bm25("tiny", "train"), ["run.parquet", "run.trec"], "bm25.0.k=20", "bm25.0.k=5")

    # evaluate: another metric.
    _matrix(
        cli,
        "evaluate",
        "evaluate",
        store.evaluate(),
        ["metrics.json", "metrics.md"],
        "evaluate.metrics=[nDCG@10]",
        "evaluate.metrics=[MRR@10]",
    )
    _summaries_read_back(store.root, {"ingest": "rows", "pools": "rows", "bm25": "rows", "evaluate": "results"})


@pytest.mark.slow
def test_kill_matrix_index_and_train(cli):
    store = cli.store
    assert cli("ingest").returncode == 0 and cli("pools").returncode == 0
    run_dir = store.dense_run("tiny", "train", "dense")
    _matrix(cli, "index", "index/search", run_dir, ["run.parquet"], "index.k=10", "index.k=5", points=("manifest",))
    # The corpus embeddings themselves, killed under another passage length (8 tokens: shorter than the
    # tiny corpus's 12-word passages, so the embeddings differ).
    emb = store.embeddings("tiny", "sentence-transformers/all-MiniLM-L6-v2")
    _matrix(
        cli,
        "index",
        "index/encode",
        emb,
        ["parts"],
        "index.passage_max_len=32",
        "index.passage_max_len=8",
        points=("manifest",),
    )

    # train (each fit costs a Ray Train start, so the cases share fits):
    # 1. killed after training but before its commit, then rerun with the same settings: it resumes from
    #    the final checkpoint (no step trained again), keeps the loss log, and commits;
    train_dir = store.train("k")
    killed = cli("train", "train.seed=1", kill="train@commit")
    assert "k: human step 2/2 (2/2 steps, 100%)" in killed.stdout, killed.stdout[-2000:]  # the driver's progress
    resumed = cli("train", "train.seed=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 2/2" not in resumed.stdout + resumed.stderr and read_manifest(train_dir)["status"] == "complete"
    assert not list(Path(train_dir, "ray_results").glob("*/data"))  # the group files go with the commit
    assert (Path(train_dir) / "loss.png").stat().st_size > 1000
    seed1 = _digest(train_dir, ["model/model.safetensors"])
    assert "reusing" in cli("train", "train.seed=1", "train.max_failures=3").stdout  # run control only
    # 2. killed with another seed after its model moved in place (not committed): the index refuses the
    #    model meanwhile, and a rerun with the first seed trains afresh to the same weights.
    cli("train", "train.seed=0", kill="train@manifest")
    refused = cli("index", "index.model=" + str(Path(train_dir) / "model"))
    assert refused.returncode == 2 and "manifest status is 'running'" in refused.stderr, refused.stderr
    assert _digest_unchecked(train_dir, ["model/model.safetensors"]) != seed1  # seed 0's model sits there
    again = cli("train", "train.seed=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _digest(train_dir, ["model/model.safetensors"]) == seed1
    _summaries_read_back(store.root, {"train": "phases", "index": "encode|target|shards"})


@pytest.mark.slow
def test_one_writer_per_stage_folder(cli, tmp_path):
    """Two `utilrag pools` runs on one output directory at once: the second exits 2 with one line naming
    the holder and touches nothing; the first commits what a clean run commits. Then a holder SIGKILLed
    at its begin: the rerun takes its lease over at once."""
    from utilrag.lease import LEASE

    assert cli("ingest").returncode == 0
    folder = cli.store.pools("tiny", "train")
    assert cli("pools", "pools.0.seed=7").returncode == 0
    clean = _digest(folder, ["pools.parquet"])
    assert cli("pools", "pools.0.seed=0").returncode == 0

    # 1. A (seed 7) is held just after its begin: the folder is marked running and the lease is A's.
    gate = tmp_path / "gate"
    first = cli.start("pools", "pools.0.seed=7", pause="pools@begin", gate=gate)
    try:
        wait_paused(first, gate)
        marker = (Path(folder) / "manifest.json").read_text()
        held = json.loads((Path(folder) / LEASE).read_text())
        assert held["pid"] == first.pid and json.loads(marker)["status"] == "running"

        # B (seed 0) on the same folder: one line naming A, exit 2, and nothing of A's touched.
        second = cli("pools", "pools.0.seed=0")
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"utilrag: error: {folder} is being written by pools"), lines
        assert f"pid {first.pid} on " in lines[0]
        assert (Path(folder) / "manifest.json").read_text() == marker
        assert json.loads((Path(folder) / LEASE).read_text())["token"] == held["token"]
        assert [p.name for p in Path(folder).glob(".staging-*")] == [f".staging-{held['token'][:12]}"]  # A's
        # `utilrag status` names A as the folder's live writer (no Ray, no model: it reads manifests).
        seen = json.loads(cli("status", "--json").stdout)["folders"]
        pools_state = next(f for f in seen if f["folder"] == "pools/tiny-train")
        assert pools_state["state"] == "running" and f"pid {first.pid} on " in pools_state["detail"], pools_state
        assert next(f for f in seen if f["folder"] == "ingest/tiny")["state"] == "complete"
    finally:
        gate.touch()
    assert first.wait(timeout=600) == 0, Path(f"{gate}.log").read_text()[-3000:]
    assert _digest(folder, ["pools.parquet"]) == clean  # A's commit: the clean seed-7 run's table
    assert not (Path(folder) / LEASE).exists()  # released

    # 2. A holder SIGKILLed after its begin leaves its lease; the rerun takes it over at once.
    cli("pools", "pools.0.seed=0", kill="pools@begin")
    assert json.loads((Path(folder) / LEASE).read_text())["stage"] == "pools"
    table = cli("status").stdout  # the holder is gone: interrupted, and why
    assert [ln for ln in table.splitlines() if "pools/tiny-train" in ln][0].split(" | ")[2] == "interrupted", table
    assert "is gone" in table
    again = cli("pools", "pools.0.seed=7")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "took over the lease" in again.stdout + again.stderr and "is gone" in again.stdout + again.stderr
    assert _digest(folder, ["pools.parquet"]) == clean and not (Path(folder) / LEASE).exists()
