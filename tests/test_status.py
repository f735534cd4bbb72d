"""`utilrag status` and `utilrag pipeline --dry-run` on a run directory whose manifests are written by
hand: every state, the folders a config asks for in pipeline order, one outside the config, and no
Ray or model started (both read manifests only). The live cases (a held writer, a SIGKILLed one,
locally and on the S3-compatible server) are in test_kill_matrix.py and test_object_storage.py."""

from __future__ import annotations

import json
import os

from utilrag import lease
from utilrag.cli import main
from utilrag.store import Store, write_manifest, write_text


def _config(make_config, tiny_dataset):
    return make_config(
        {
            "ingest": {"datasets": [{"name": "tiny", "path": str(tiny_dataset), "layout": "msmarco"}]},
            "pools": [{"dataset": "tiny", "split": "train", "size": 8}],
            "bm25": [{"dataset": "tiny", "split": "train"}],
        }
    )


def test_status_and_dry_run_read_the_run_directory(make_config, tiny_dataset, tmp_path, capsys, monkeypatch):
    from utilrag import raycluster

    def no_ray(*_a, **_k):
        raise AssertionError("status and --dry-run start no Ray")

    monkeypatch.setattr(raycluster, "connect", no_ray)
    cfg = _config(make_config, tiny_dataset)
    at = Store(cfg.output_dir)
    write_manifest(at.ingest("tiny"), stage="ingest", status="complete", wall_time_s=3.5, outputs=["corpus"])
    # pools: marked running by a process that is gone (a pid of this host that no longer exists)
    write_manifest(at.pools("tiny", "train"), stage="pools", status="running")
    record = {**lease._record("pools", "t" * 32), "pid": 2**22 + 17, "pid_started": 1.0}
    write_text(os.path.join(at.pools("tiny", "train"), lease.LEASE), json.dumps(record))
    # bm25: running, held by a live process (this test's parent)
    write_manifest(at.bm25("tiny", "train"), stage="bm25", status="running")
    record = {
        **lease._record("bm25", "u" * 32),
        "pid": os.getppid(),
        "pid_started": lease._process_started(os.getppid()),
    }
    write_text(os.path.join(at.bm25("tiny", "train"), lease.LEASE), json.dumps(record))
    # an annotation this config does not ask for, failed above its error threshold
    write_manifest(at.annotate("tiny", "train"), stage="annotate", status="failed", errors={"rows": 3, "share": 0.03})

    config = str(tmp_path / "config.yaml")
    assert main(["status", "--config", config, "--json"]) == 0
    seen = json.loads(capsys.readouterr().out)
    states = {f["folder"]: (f["stage"], f["state"], f["in_config"]) for f in seen["folders"]}
    assert list(states) == ["ingest/tiny", "pools/tiny-train", "bm25/tiny-train", "report", "annotate/tiny-train"]
    assert states == {
        "ingest/tiny": ("ingest", "complete", True),
        "pools/tiny-train": ("pools", "interrupted", True),
        "bm25/tiny-train": ("bm25", "running", True),
        "report": ("report", "missing", True),
        "annotate/tiny-train": ("annotate", "failed", False),
    }
    details = {f["folder"]: f["detail"] for f in seen["folders"]}
    assert "is gone" in details["pools/tiny-train"] and f"pid {os.getppid()} on " in details["bm25/tiny-train"]
    assert details["annotate/tiny-train"] == "3 error rows (3.000%)"

    assert main(["status", "--config", config]) == 0
    table = capsys.readouterr().out
    assert "| ingest | ingest/tiny | complete | 4s |" in table
    assert table.strip().endswith("1 complete, 1 interrupted, 1 running, 1 missing, 1 failed")

    # The plan of `pipeline --from pools`: its stages in order, their folders, nothing run.
    assert main(["pipeline", "--dry-run", "--from", "pools", "--config", config, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"] == ["pools", "bm25", "report"]
    assert [f["folder"] for f in plan["folders"]] == ["pools/tiny-train", "bm25/tiny-train", "report"]
    assert plan["plan"]["stages"] == plan["stages"] and plan["plan"]["settings"] == []  # no train section
    assert main(["pipeline", "--dry-run", "--only", "nonsense", "--config", config]) == 2
    assert capsys.readouterr().err.strip() == "utilrag: error: unknown stage 'nonsense'; stages: " + ", ".join(
        [
            "ingest",
            "querygen",
            "candidates",
            "pools",
            "bm25",
            "annotate",
            "train",
            "index",
            "judge",
            "evaluate",
            "rag",
            "report",
        ]
    )
