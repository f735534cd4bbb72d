"""benchmarks/gpu_check.py in its CPU mode: the GPU check's own steps at toy size, so the script
that runs on a lent GPU for a few minutes never rots in between. Also the two-phase curriculum on
one engine (ZeRO 0-3, against a plain PyTorch loop, with a no-reset control) and the ZeRO-3 save."""

import json
import os
import subprocess
import sys

import pytest

from utilrag.paths import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    checks = result["checks"]
    assert set(checks) == {"zero", "checkpoint", "curriculum", "zero3_save", "encode", "search", "prefill"}
    assert all(c["ok"] for c in checks.values()), {k: c for k, c in checks.items() if not c["ok"]}

    zero = checks["zero"]
    for precision in ("fp32", "bf16"):
        assert zero[precision]["finite"] and zero[precision]["loss_decreased"]
        assert zero[precision]["max_rel_diff_vs_zero0"] <= zero[precision]["tolerance"]
    assert zero["fp32"]["max_rel_diff_vs_zero0"] <= 1e-4  # fp32: ZeRO 0/1/2/3 take the same steps
    assert zero["bf16"]["zero0_runs_as"] == 1 and zero["fp32"]["zero0_runs_as"] == 0

    for stage in ("zero2", "zero3"):  # three steps after the resume: moments and schedule restored too
        resumed = checks["checkpoint"][stage]
        assert resumed["losses_resumed"] == resumed["losses_uninterrupted"] and resumed["max_weight_diff"] == 0.0
    assert zero["bf16"]["skipped_steps"] == {f"zero{k}": 0 for k in range(4)}

    curriculum = checks["curriculum"]
    for stage in ("zero0", "zero1", "zero2", "zero3"):
        assert curriculum[stage]["equal_to_reference"], curriculum[stage]
        lrs = curriculum[stage]["lrs"]
        assert lrs[3] == lrs[0] > lrs[2]  # phase 2 starts its own schedule
    assert not curriculum["zero2_without_reset"]["equal_to_reference"]  # the check can tell

    save = checks["zero3_save"]
    assert save["max_diff_vs_trained"] == 0.0 and save["moved_from_init"] > 0
    assert save["naive_rank0_save_params"] == 0  # the defect the gathered save fixes: empty tensors
    half = save["half_precision_save"]  # bf16 training saves the fp32 masters, not the bf16 copies
    assert half["dtypes"] == ["float32"] and half["max_diff_vs_fp32_masters"] == 0.0
    assert half["share_not_bf16_representable"] > 0.5

    assert checks["search"]["topk_overlap"] == 1.0
    assert checks["prefill"]["prompt_tokens_per_s"] > 0 and checks["encode"]["docs_per_s"] > 0
