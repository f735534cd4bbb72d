"""The DeepSpeed engine around the bi-encoder: built once per worker, kept across curriculum phases.

A curriculum phase starts with a fresh AdamW state and its own warmup/linear-decay schedule, but
on the same engine: a second ``deepspeed.initialize`` on the same module would leave the first
engine's ZeRO gradient hooks attached (``contiguous_gradients`` installs them even at stage 1).
Only torch and DeepSpeed here (no Ray), so ``benchmarks/gpu_check.py`` runs it on a bare GPU box.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from utilrag.config import TrainConfig
from utilrag.encoder_spec import EncoderSpec


def resolve_precision(tcfg: TrainConfig) -> str:
    """``auto``: bf16 on a GPU that has it (A100/H100/H200), fp16 on older GPUs, fp32 on CPU."""
    if tcfg.precision != "auto":
        return tcfg.precision
    if tcfg.use_gpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def effective_zero_stage(tcfg: TrainConfig) -> int:
    """Half precision runs at ZeRO >= 1. DeepSpeed 0.19 wraps a bf16/fp16 model at ZeRO-0 in its
    unfused fp16 optimizer, whose loss-scale profile ignores ``initial_scale_power``: on an H200 it
    skipped bf16 steps as overflows (bf16 needs no loss scaling; ZeRO-1/2/3 skipped none) and took
    other fp16 steps than ZeRO-1/2/3, which agree with each other. ZeRO-1 keeps fp32 master weights
    and costs the same communication volume (reduce-scatter + all-gather instead of all-reduce)."""
    if tcfg.deepspeed_zero_stage == 0 and resolve_precision(tcfg) in ("bf16", "fp16"):
        return 1
    return tcfg.deepspeed_zero_stage


def deepspeed_config(tcfg: TrainConfig) -> dict[str, Any]:
    precision = resolve_precision(tcfg)
    stage = effective_zero_stage(tcfg)
    zero: dict[str, Any] = {"stage": stage}
    return {
        "train_micro_batch_size_per_gpu": tcfg.per_device_queries,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
    }


class WarmupLinearDecay:
    """lr factor: linear warmup over ``warmup`` steps, then linear decay to 0 at ``total`` steps.
    A callable object (not a lambda) so that LambdaLR's state_dict, and with it every DeepSpeed
    checkpoint, carries the phase's step counts."""

    def __init__(self, total: int, warmup_ratio: float):
        self.total, self.warmup = total, int(total * warmup_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def setup_model_and_engine(tcfg: TrainConfig, model_path: str, total_steps: int, model=None):
    """The bi-encoder, AdamW and the first phase's schedule inside one DeepSpeed engine.
    Returns (model, engine); DeepSpeed keeps the AdamW as ``engine.client_optimizer``, which later
    phases reset."""
    import deepspeed

    from utilrag.train.modeling import BiEncoder

    model = model or BiEncoder(
        model_path, tcfg.pooling, tcfg.normalize, tcfg.shared_encoder, tcfg.gradient_checkpointing
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(total_steps, tcfg.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tcfg)
    )
    return model, engine


def new_phase_schedule(engine, tcfg: TrainConfig, total_steps: int) -> None:
    """Give the engine a fresh warmup/decay schedule for a phase of ``total_steps`` steps."""
    optimizer = engine.client_optimizer
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupLinearDecay(total_steps, tcfg.warmup_ratio)
    )


def reset_optimizer_state(engine) -> None:
    """Forget AdamW's moments and step counts (they are created lazily at the next step). The
    ZeRO wrappers keep the same inner optimizer and its fp32 master partitions, so this is all
    a fresh optimizer amounts to."""
    engine.client_optimizer.state.clear()


def train_step(engine, batch, tcfg: TrainConfig) -> float:
    from utilrag.train.loss import contrastive_scores, loss_for

    b, g, p_len = batch["p_ids"].shape
    device = engine.device
    q, p = engine(
        batch["q_ids"].to(device),
        batch["q_mask"].to(device),
        batch["p_ids"].reshape(b * g, p_len).to(device),
        batch["p_mask"].reshape(b * g, p_len).to(device),
    )
    scores, mask = contrastive_scores(q.float(), p.float(), batch["positives"].bool().to(device), tcfg.temperature)
    loss = loss_for(tcfg.loss, tcfg.positives)(scores, mask)
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def encoder_spec(tcfg: TrainConfig) -> EncoderSpec:
    """How the trained model encodes: what the index and RAG stages read back."""
    return EncoderSpec(
        pooling=tcfg.pooling,
        normalize=tcfg.normalize,
        temperature=tcfg.temperature,
        query_max_len=tcfg.query_max_len,
        passage_max_len=tcfg.passage_max_len,
        shared=tcfg.shared_encoder,
    )


def save_hf_model(engine, model, folder: Path, tokenizer, rank: int, spec: EncoderSpec | None = None) -> None:
    """Save the bi-encoder in Hugging Face format, in fp32. In bf16/fp16 the module holds 16-bit
    copies: the fp32 master weights of ZeRO's optimizer are what gets saved. Under ZeRO-3 every
    rank holds only a slice of each parameter, so all ranks gather together and rank 0 writes."""
    import contextlib

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    stage = engine.zero_optimization_stage()
    weights: dict[str, torch.Tensor] = {}
    if stage > 0 and (engine.bfloat16_enabled() or engine.fp16_enabled()):
        for name, param in model.named_parameters():
            full = safe_get_full_fp32_param(param)  # a collective under ZeRO-3: every rank calls it
            if rank == 0 and full is not None:
                weights[name] = full.detach().cpu()
    gather = (
        deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        if stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if rank == 0:
            model.save(folder, tokenizer, weights or None, spec)


class CheckpointClock:
    """When to checkpoint: every ``every_s`` seconds of rank 0's wall clock (all ranks must save
    together, so rank 0 decides and broadcasts), and optionally every ``every_steps`` steps."""

    def __init__(self, every_s: float, every_steps: int | None, device):
        self.every_s, self.every_steps, self.device = every_s, every_steps, device
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        """Collective: every rank calls it every step (one int broadcast; the step's loss.item()
        synchronises with the device anyway)."""
        import torch.distributed as dist

        flag = time.monotonic() - self.last >= self.every_s
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([1 if flag else 0], device=self.device)
            dist.broadcast(tensor, src=0)
            flag = bool(tensor.item())
        return flag or (self.every_steps is not None and step % self.every_steps == 0)

    def saved(self) -> None:
        self.last = time.monotonic()
