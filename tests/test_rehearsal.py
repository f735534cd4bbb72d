"""benchmarks/rehearsal.py's capped case in the suite: the paper config's annotation shape on a fake
multi-node cluster under autoscaler v2, time compressed by F = 60, through the five injected failures
(an engine that fails its first start, a query whose requests always raise, an engine-core process
SIGKILLed, a GPU node SIGKILLed, the driver SIGKILLed and the job resubmitted). The engine is the
rehearsal's stand-in (labelled as such: an engine-core child process at the cost model's A100 rates / F);
the cluster, Ray Data and the annotation stage's code are real. The speed figures live in the benchmark's
JSON (benchmarks/results/rehearsal*.json), not here."""

from __future__ import annotations

import sys

import pytest

from utilrag.paths import REPO_ROOT

QUERIES = 768  # 12 blocks of 64: every failure lands mid-job, with blocks in flight


@pytest.mark.slow
def test_the_rehearsal_survives_a_gpu_clusters_failures_exactly_once(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from rehearsal import rehearse

    result = rehearse(QUERIES, 60.0, tmp_path)
    summary = {k: v for k, v in result.items() if k != "engine"}
    assert result["completed"], summary  # one submission and the one resubmit
    assert set(result["failures_injected"]) == {"engine_start", "poison_query", "engine_core", "gpu_node", "driver"}
    # Exactly once: one row per query in the parts, the poison query the only error row.
    assert result["parts_rows"] == QUERIES and result["duplicates"] == 0, summary
    assert result["error_rows"] == 1 and result["poison_is_the_only_error_row"], summary
    assert result["annotated"] == QUERIES - 1, summary
    # Placement: GPU-type nodes for the replicas and the lost node's replacement, none for CPU work.
    assert result["gpu_nodes_launched"] == result["gpu_nodes_needed"], summary
    assert result["orphan_engines"] == 0, summary
    # Redone work: only what was in flight on the killed units (engine core, node, driver).
    assert result["redone_queries"] > 0 and result["redone_outside_lost"] == 0, summary  # redone within lost
    assert result["redone_blocks"] <= result["blocks_in_flight_lost"], summary
    assert 0 < result["engine_fill"] <= 1, summary
