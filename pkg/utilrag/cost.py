"""The one annotation cost model: what the report, the README and the benchmarks quote.

GPU-hours = queries x ((prompt - prefix-cached) tokens / prefill rate + output tokens / decode rate) / 3600,
per query over the LLM stages a config runs. The annotation is prefill-bound (~5,000-6,000 prompt tokens
and ~100 output tokens per MS MARCO query), so the prefill rate is what matters, and it is the one rate
measured: Qwen2.5-32B's architecture in bf16 on one H200 (plain PyTorch + SDPA, ``benchmarks/gpu_check.py``),
whose bf16 dense peak equals the H100's. vLLM's efficiency over that plain forward and the decode rate are
assumed, and named as such wherever a figure is printed. ``benchmarks/annotation_cost.py`` counts the
tokens exactly for the paper config; the report uses the tokens its own run measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MEASURED_PREFILL_TOKENS_PER_S = 9287.0
MEASURED_PREFILL_OF = (
    "Qwen2.5-32B's architecture in bf16 (plain PyTorch + SDPA) on one NVIDIA H200, "
    "benchmarks/results/gpu_check-h200-2026-11-28.json (the H100's bf16 dense peak is the same)"
)
ASSUMED_VLLM_EFFICIENCY = 0.8  # paged attention, scheduling, tensor-parallel communication
ASSUMED_DECODE_TOKENS_PER_S = 800.0  # per GPU, batched decode of ~100 output tokens per query


@dataclass(frozen=True)
class Rates:
    prefill_tokens_per_s: float = MEASURED_PREFILL_TOKENS_PER_S  # measured (one GPU, plain forward)
    vllm_efficiency: float = ASSUMED_VLLM_EFFICIENCY  # assumed
    decode_tokens_per_s: float = ASSUMED_DECODE_TOKENS_PER_S  # assumed

    def as_dict(self) -> dict:
        return asdict(self)


def gpu_hours(queries: int, prompt: float, cached: float, output: float, rates: Rates = Rates()) -> float:
    """GPU-hours for ``queries`` queries of ``prompt`` prompt tokens (``cached`` of them served by the prefix
    cache) and ``output`` output tokens each."""
    prefill_s = (prompt - cached) / (rates.prefill_tokens_per_s * rates.vllm_efficiency)
    return queries * (prefill_s + output / rates.decode_tokens_per_s) / 3600
