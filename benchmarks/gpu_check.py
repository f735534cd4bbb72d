"""GPU check: the project's own training, encoding and search code on one GPU, in one short run.

    python benchmarks/gpu_check.py            # one NVIDIA GPU, <= 8 minutes on an H100/H200
    python benchmarks/gpu_check.py --cpu      # the same steps at toy size on CPU (run by `make test`)

Needs torch, transformers, DeepSpeed and pydantic; faiss-cpu for the search comparison (skipped
with a note when absent). No Ray, vLLM or faiss-gpu: a bare GPU box is enough. Every model is a
randomly initialised config: no weights travel. Steps, each recorded in the JSON (last line):

1. ``zero``: bi-encoder training steps (modeling + SumMargLH + the DeepSpeed engine, world size 1:
   NCCL on GPU, gloo on CPU) at ZeRO 0/1/2/3 in bf16 and fp16 (CPU: fp32 and bf16); losses finite
   and equal across ZeRO stages within the precision's tolerance.
2. ``checkpoint``: save after k steps, load into a fresh engine: the next loss equals the
   uninterrupted run's.
3. ``curriculum``: two phases on one engine (fresh AdamW state and schedule in phase 2) at
   ZeRO 0/1/2/3 in fp32, against a plain PyTorch loop doing the same: equal losses and weights.
4. ``zero3_save``: the ZeRO-3 model saved through ``save_hf_model`` holds the full trained
   weights (and what a rank-0-only save without gathering would have written).
5. ``encode``: BERT-base-sized encoder forward + pooling in bf16: docs/s, tokens/s, MFU.
6. ``search``: exact top-k with torch on the GPU (``TorchFlatIndex``) vs faiss-cpu IndexFlatIP.
7. ``prefill``: Qwen2.5-32B's architecture (uninitialised bf16 weights, built on the meta device
   and allocated on the GPU), forward over RelSel-sized prompts with SDPA: prompt tokens/s, MFU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
BF16_PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
QWEN25_32B = dict(
    hidden_size=5120,
    num_hidden_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
    intermediate_size=27648,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
BERT_BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=30522,
    max_position_embeddings=512,
)


def sizes(cpu: bool) -> dict:
    if cpu:
        return dict(
            bert=dict(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=128,
                vocab_size=1000,
                max_position_embeddings=128,
            ),
            queries=4,
            group=4,
            q_len=16,
            p_len=32,
            steps=4,
            encode_batch=32,
            encode_len=32,
            encode_batches=3,
            search_docs=20_000,
            search_dim=64,
            search_queries=200,
            qwen=dict(
                hidden_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=256,
                vocab_size=1000,
                max_position_embeddings=1024,
                rope_theta=1e6,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
            ),
            prompt_len=256,
            prompt_batch=2,
            prefill_repeats=2,
        )
    return dict(
        bert=BERT_BASE,
        queries=16,
        group=16,
        q_len=32,
        p_len=140,
        steps=8,
        encode_batch=512,
        encode_len=140,
        encode_batches=20,
        search_docs=1_000_000,
        search_dim=768,
        search_queries=1_000,
        qwen=QWEN25_32B,
        prompt_len=3_600,
        prompt_batch=2,
        prefill_repeats=5,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cpu: bool) -> None:
    """World size 1, as Ray Train would set it up: the engine sees a real process group."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if not cpu:
        import torch

        torch.cuda.set_device(0)
    dist.init_process_group("gloo" if cpu else "nccl", rank=0, world_size=1)


def write_models(folder: Path, cfg: dict) -> tuple[str, object]:
    """A randomly initialised BERT saved in HF format (what BiEncoder loads) and a word-level
    tokenizer built from a vocabulary file (no hub)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    config = BertConfig(**cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # deterministic steps
    BertModel(config).save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(cfg["vocab_size"] - 5)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    return str(folder), tokenizer


def batches(n: int, s: dict, vocab: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        positives = torch.zeros(s["queries"], s["group"], dtype=torch.bool)
        positives[:, 0] = True
        positives[::2, 1] = True  # every other query has two positives (SumMargLH sums them)
        out.append(
            {
                "q_ids": torch.randint(5, vocab, (s["queries"], s["q_len"]), generator=g),
                "q_mask": torch.ones(s["queries"], s["q_len"], dtype=torch.long),
                "p_ids": torch.randint(5, vocab, (s["queries"], s["group"], s["p_len"]), generator=g),
                "p_mask": torch.ones(s["queries"], s["group"], s["p_len"], dtype=torch.long),
                "positives": positives,
            }
        )
    return out


def train_config(s: dict, **kw):
    from utilrag.config import TrainConfig

    return TrainConfig(
        model="unused",
        pooling="cls",
        normalize=False,
        temperature=1.0,
        loss="summarg",
        group_size=s["group"],
        per_device_queries=s["queries"],
        query_max_len=s["q_len"],
        passage_max_len=s["p_len"],
        lr=1e-4,
        warmup_ratio=0.25,
        use_gpu=not s["cpu"],
        **kw,
    )


def close(engine) -> None:
    import torch

    try:
        engine.destroy()
    except Exception:  # noqa: BLE001 - teardown of a finished check
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_steps(tcfg, model_path: str, data: list[dict], total_steps: int, timing: dict | None = None):
    """Fresh engine, one step per batch; ``timing`` gets the mean seconds of the steps after the
    first (engine build and the first step's allocations excluded)."""
    import torch

    from utilrag.train.engine import setup_model_and_engine, train_step

    torch.manual_seed(0)
    model, engine = setup_model_and_engine(tcfg, model_path, total_steps)
    losses, t0 = [], time.perf_counter()
    for i, b in enumerate(data):
        if i == 1:
            sync("cuda" if tcfg.use_gpu else "cpu")
            t0 = time.perf_counter()
        losses.append(train_step(engine, b, tcfg))
    if timing is not None and len(data) > 1:
        timing["s_per_step"] = round((time.perf_counter() - t0) / (len(data) - 1), 4)
        timing["skipped_steps"] = int(getattr(engine, "skipped_steps", 0))
    return model, engine, losses


def check_zero(s, model_path, vocab) -> dict:
    from utilrag.train.engine import effective_zero_stage

    precisions = ["fp32", "bf16"] if s["cpu"] else ["bf16", "fp16"]
    # |loss - ZeRO-0's loss| / first loss, per step: relative to the loss scale, not to a loss near 0
    tolerance = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 5e-3}
    data = batches(2, s, vocab, seed=1) * (s["steps"] // 2)  # two batches seen in turn: the loss must fall
    out: dict = {"ok": True}
    for precision in precisions:
        losses, skipped = {}, {}
        for stage in (0, 1, 2, 3):
            tcfg = train_config(s, deepspeed_zero_stage=stage, precision=precision)
            timing: dict = {}
            _, engine, losses[stage] = run_steps(tcfg, model_path, data, s["steps"], timing)
            out[f"{precision}_zero{stage}_s_per_step"] = timing["s_per_step"]
            skipped[stage] = timing["skipped_steps"]
            close(engine)
        finite = all(math.isfinite(v) for ls in losses.values() for v in ls)
        diff = max(abs(a - b) / abs(losses[0][0]) for st in (1, 2, 3) for a, b in zip(losses[st], losses[0]))
        decreased = all(ls[-2] < ls[0] for ls in losses.values())  # batch 0, first and last visit
        out[precision] = {
            "losses": {f"zero{k}": [round(v, 5) for v in ls] for k, ls in losses.items()},
            "zero0_runs_as": effective_zero_stage(train_config(s, deepspeed_zero_stage=0, precision=precision)),
            "finite": finite,
            "max_rel_diff_vs_zero0": round(diff, 6),
            "tolerance": tolerance[precision],
            "loss_decreased": decreased,
            # overflow-skipped steps (fp16's dynamic loss scale finds its level; bf16 needs none)
            "skipped_steps": {f"zero{k}": v for k, v in skipped.items()},
        }
        no_skips = precision == "fp16" or not any(skipped.values())
        out["ok"] &= finite and diff <= tolerance[precision] and decreased and no_skips
    return out


def check_checkpoint(s, model_path, vocab, folder: Path) -> dict:
    """Save after 3 steps, load into a fresh engine, train 3 more: the losses of steps 5 and 6
    depend on the restored AdamW moments, fp32 masters and schedule, not only on the weights."""
    from utilrag.train.engine import setup_model_and_engine, train_step

    precision = "fp32" if s["cpu"] else "bf16"
    data = batches(6, s, vocab, seed=2)
    out: dict = {"ok": True, "precision": precision}
    for stage in (2, 3):
        tcfg = train_config(s, deepspeed_zero_stage=stage, precision=precision)
        model, engine, straight = run_steps(tcfg, model_path, data, 6)
        straight_weights = gathered_state(engine, model)
        close(engine)
        _, engine, _ = run_steps(tcfg, model_path, data[:3], 6)
        engine.save_checkpoint(str(folder / f"zero{stage}"), tag="ckpt")
        close(engine)
        model, engine = setup_model_and_engine(tcfg, model_path, 6)
        engine.load_checkpoint(str(folder / f"zero{stage}"), tag="ckpt")
        resumed = [train_step(engine, b, tcfg) for b in data[3:]]
        resumed_weights = gathered_state(engine, model)
        close(engine)
        loss_diff = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(resumed, straight[3:]))
        weight_diff = max(float((resumed_weights[k] - straight_weights[k]).abs().max()) for k in straight_weights)
        same = loss_diff <= 1e-5 and weight_diff <= 1e-5
        out[f"zero{stage}"] = {
            "losses_uninterrupted": straight[3:],
            "losses_resumed": resumed,
            "max_loss_diff": loss_diff,
            "max_weight_diff": weight_diff,
            "equal": same,
        }
        out["ok"] &= same
    return out


def reference_two_phases(s, model_path, tcfg, phase_data: list[list[dict]]):
    """Plain PyTorch: AdamW + the same warmup/decay + clipping at 1.0; phase 2 a new AdamW."""
    import torch

    from utilrag.train.engine import WarmupLinearDecay
    from utilrag.train.loss import contrastive_scores, loss_for
    from utilrag.train.modeling import BiEncoder

    device = "cpu" if s["cpu"] else "cuda"
    torch.manual_seed(0)
    model = BiEncoder(model_path, tcfg.pooling, tcfg.normalize, True).to(device)
    initial = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    losses = []
    for data in phase_data:
        opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupLinearDecay(len(data), tcfg.warmup_ratio))
        for b in data:
            bq, g, p_len = b["p_ids"].shape
            q, p = model(
                b["q_ids"].to(device),
                b["q_mask"].to(device),
                b["p_ids"].reshape(bq * g, p_len).to(device),
                b["p_mask"].reshape(bq * g, p_len).to(device),
            )
            scores, mask = contrastive_scores(q.float(), p.float(), b["positives"].to(device), tcfg.temperature)
            loss = loss_for(tcfg.loss, tcfg.positives)(scores, mask)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    return model, losses, initial


def check_curriculum(s, model_path, vocab) -> dict:
    import torch

    from utilrag.train.engine import new_phase_schedule, reset_optimizer_state, setup_model_and_engine, train_step

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both sides of the comparison
    torch.backends.cudnn.allow_tf32 = False
    phases = [batches(3, s, vocab, seed=3), batches(3, s, vocab, seed=4)]
    tcfg = train_config(s, precision="fp32")
    ref_model, ref_losses, initial = reference_two_phases(s, model_path, tcfg, phases)
    reference = {k: v.detach().float().cpu() for k, v in ref_model.state_dict().items()}
    del ref_model
    update = sum(float((reference[k] - initial[k]).norm()) ** 2 for k in reference) ** 0.5
    out: dict = {"ok": True, "reference_losses": [round(v, 6) for v in ref_losses], "update_norm": update}
    for stage, reset in ((0, True), (1, True), (2, True), (3, True), (2, False)):
        tcfg = train_config(s, deepspeed_zero_stage=stage, precision="fp32")
        torch.manual_seed(0)
        model, engine = setup_model_and_engine(tcfg, model_path, len(phases[0]))
        losses, lrs = [], []
        for index, data in enumerate(phases):
            if index and reset:
                reset_optimizer_state(engine)
            if index:
                new_phase_schedule(engine, tcfg, len(data))
            for b in data:
                lrs.append(engine.get_lr()[0])
                losses.append(train_step(engine, b, tcfg))
        weights = gathered_state(engine, model)
        close(engine)
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        # how far the weights are from the reference's, as a share of the reference's own update
        weight_diff = sum(float((weights[k] - reference[k]).norm()) ** 2 for k in reference) ** 0.5 / update
        equal = loss_diff <= 1e-4 and weight_diff <= 1e-2
        key = f"zero{stage}" if reset else f"zero{stage}_without_reset"
        out[key] = {
            "losses": [round(v, 6) for v in losses],
            "lrs": [round(v, 8) for v in lrs],
            "max_loss_rel_diff": loss_diff,
            "weight_diff_share_of_update": weight_diff,
            "equal_to_reference": equal,
        }
        # the control (AdamW state carried into phase 2) must be told apart, or the check is blind
        out["ok"] &= equal if reset else not equal
    return out


def gathered_state(engine, model) -> dict:
    """Full fp32 copies of the weights, gathered under ZeRO-3."""
    import deepspeed

    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def check_zero3_save(s, model_path, vocab, tokenizer, folder: Path) -> dict:
    from transformers import AutoModel

    from utilrag.train.engine import save_hf_model

    tcfg = train_config(s, deepspeed_zero_stage=3, precision="fp32")
    model, engine, _ = run_steps(tcfg, model_path, batches(2, s, vocab, seed=5), 2)
    trained = gathered_state(engine, model)
    save_hf_model(engine, model, folder / "gathered", tokenizer, rank=0)
    naive_error = None
    try:  # what a rank-0-only save_pretrained of partitioned parameters writes
        from safetensors.torch import load_file

        model.query_encoder.save_pretrained(folder / "naive")
        naive_numel = sum(t.numel() for t in load_file(folder / "naive" / "model.safetensors").values())
    except Exception as e:  # noqa: BLE001 - recorded, it is the defect being shown
        naive_numel, naive_error = None, f"{type(e).__name__}: {str(e)[:200]}"
    close(engine)
    half = check_half_precision_save(s, model_path, vocab, tokenizer, folder / "half")
    saved = AutoModel.from_pretrained(folder / "gathered")
    base = AutoModel.from_pretrained(model_path)
    diff = max(float((p.float() - trained[f"query_encoder.{n}"]).abs().max()) for n, p in saved.named_parameters())
    moved = max(float((p - b).abs().max()) for p, b in zip(saved.parameters(), base.parameters()))
    numel = sum(p.numel() for p in saved.parameters())
    ok = diff == 0.0 and moved > 0 and numel == sum(p.numel() for p in base.parameters()) and half["ok"]
    return {
        "half_precision_save": half,
        "ok": ok,
        "saved_params": numel,
        "max_diff_vs_trained": diff,
        "moved_from_init": moved,
        "naive_rank0_save_params": naive_numel,
        "naive_rank0_save_error": naive_error,
    }


def check_half_precision_save(s, model_path, vocab, tokenizer, folder: Path) -> dict:
    """bf16 at ZeRO-3: the saved model is fp32, equal to the optimizer's fp32 masters, not to the
    module's bf16 copies (most fp32 values are not bf16-representable)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    from utilrag.train.engine import save_hf_model

    tcfg = train_config(s, deepspeed_zero_stage=3, precision="bf16")
    model, engine, _ = run_steps(tcfg, model_path, batches(2, s, vocab, seed=6), 2)
    masters = {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in model.named_parameters()}
    save_hf_model(engine, model, folder, tokenizer, rank=0)
    close(engine)
    saved = load_file(folder / "model.safetensors")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in saved.values()})
    diff = max(
        float((saved[n].float() - masters[f"query_encoder.{n}"]).abs().max())
        for n in saved
        if f"query_encoder.{n}" in masters
    )
    values = torch.cat([t.flatten() for t in saved.values() if t.is_floating_point()])
    not_bf16 = float((values.bfloat16().float() != values).float().mean())
    return {
        "ok": dtypes == ["float32"] and diff == 0.0 and not_bf16 > 0.5,
        "dtypes": dtypes,
        "max_diff_vs_fp32_masters": diff,
        "share_not_bf16_representable": round(not_bf16, 4),
    }


def check_encode(s, model_path, peak) -> dict:
    import torch

    from utilrag.train.modeling import BiEncoder

    device = "cpu" if s["cpu"] else "cuda"
    dtype = torch.float32 if s["cpu"] else torch.bfloat16
    model = BiEncoder(model_path, "cls", False, True).to(device=device, dtype=dtype).eval()
    b, n = s["encode_batch"], s["encode_len"]
    ids = torch.randint(5, s["bert"]["vocab_size"], (b, n), device=device)
    mask = torch.ones(b, n, dtype=torch.long, device=device)
    with torch.inference_mode():
        for _ in range(2):
            model.encode(model.passage_encoder, ids, mask)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(s["encode_batches"]):
            vectors = model.encode(model.passage_encoder, ids, mask)
        sync(device)
        seconds = time.perf_counter() - t0
    cfg = s["bert"]
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    flops_per_token = 2 * layers * (4 * h * h + 2 * h * inter) + 4 * layers * n * h  # matmuls + attention
    docs = b * s["encode_batches"]
    tokens_s = docs * n / seconds
    del model
    return {
        "ok": bool(torch.isfinite(vectors.float()).all()),
        "dtype": str(dtype).replace("torch.", ""),
        "batch": b,
        "tokens_per_doc": n,
        "docs_per_s": round(docs / seconds, 1),
        "tokens_per_s": round(tokens_s),
        "model_tflops_per_s": round(tokens_s * flops_per_token / 1e12, 2),
        "mfu": round(tokens_s * flops_per_token / peak, 4) if peak else None,
        "flops_per_token": flops_per_token,
    }


def check_search(s) -> dict:
    import numpy as np

    from utilrag.index.torch_flat import TorchFlatIndex

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((s["search_docs"], s["search_dim"]), dtype=np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[rng.choice(len(docs), s["search_queries"], replace=False)]
    queries = queries + 0.1 * rng.standard_normal(queries.shape, dtype=np.float32)
    k = 100
    device = "cpu" if s["cpu"] else "cuda"
    index = TorchFlatIndex(s["search_dim"], device=device)
    for start in range(0, len(docs), 250_000):
        index.add(docs[start : start + 250_000])
    index.search(queries[:10], k)
    t0 = time.perf_counter()
    t_scores, t_ids = index.search(queries, k)
    torch_s = time.perf_counter() - t0
    out = {
        "docs": len(docs),
        "dim": s["search_dim"],
        "queries": len(queries),
        "k": k,
        "torch_qps": round(len(queries) / torch_s, 1),
        "device": device,
    }
    try:
        import faiss
    except ImportError:
        return {**out, "ok": True, "faiss": "faiss not installed: comparison skipped"}
    flat = faiss.IndexFlatIP(s["search_dim"])
    flat.add(docs)
    t0 = time.perf_counter()
    f_scores, f_ids = flat.search(queries, k)
    faiss_s = time.perf_counter() - t0
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(t_ids, f_ids)]))
    score_diff = float(np.abs(t_scores - f_scores).max())
    return {
        **out,
        "faiss_cpu_qps": round(len(queries) / faiss_s, 1),
        "faiss_threads": faiss.omp_get_max_threads(),
        "topk_overlap": overlap,
        "max_score_diff": score_diff,
        "ok": overlap >= 0.999 and score_diff <= 1e-3,
    }


def check_prefill(s, peak) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2Model

    device = "cpu" if s["cpu"] else "cuda"
    dtype = torch.float32 if s["cpu"] else torch.bfloat16
    config = Qwen2Config(**s["qwen"], attn_implementation="sdpa", dtype=dtype)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta parameters in bf16, so that to_empty allocates bf16
    try:
        with torch.device("meta"):
            model = Qwen2Model(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device).eval()
    head_dim = config.hidden_size // config.num_attention_heads
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 1e4)
    with torch.no_grad():  # values do not matter for speed, but keep them finite; the rotary
        for p in model.parameters():  # frequencies are buffers the meta build left empty
            p.normal_(0.0, 0.02)
        for module in model.modules():
            if hasattr(module, "inv_freq"):
                inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
                module.inv_freq = inv_freq
                if hasattr(module, "original_inv_freq"):
                    module.original_inv_freq = inv_freq
    lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters()) + lm_head.weight.numel()
    b, n = s["prompt_batch"], s["prompt_len"]
    ids = torch.randint(0, config.vocab_size, (b, n), device=device)

    def forward():
        hidden = model(input_ids=ids).last_hidden_state
        return lm_head(hidden[:, -1])  # vLLM computes logits for the last prompt token only

    with torch.inference_mode():
        for _ in range(2):
            logits = forward()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(s["prefill_repeats"]):
            logits = forward()
        sync(device)
        seconds = time.perf_counter() - t0
    h, layers = config.hidden_size, config.num_hidden_layers
    embed = config.vocab_size * h
    heads_dim = config.num_attention_heads * (h // config.num_attention_heads)
    # matmul FLOPs per prompt token: 2 x (parameters but the embeddings and lm_head) + causal
    # attention (QK^T and AV over on average n/2 earlier tokens).
    flops_per_token = 2 * (params - 2 * embed) + 2 * 2 * layers * (n / 2) * heads_dim
    tokens_s = b * n * s["prefill_repeats"] / seconds
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {
        "ok": bool(torch.isfinite(logits.float()).all()),
        "params_b": round(params / 1e9, 3),
        "layers": layers,
        "hidden": h,
        "prompt_tokens": n,
        "batch": b,
        "build_s": round(build_s, 1),
        "prompt_tokens_per_s": round(tokens_s),
        "model_tflops_per_s": round(tokens_s * flops_per_token / 1e12, 1),
        "mfu": round(tokens_s * flops_per_token / peak, 4) if peak else None,
        "peak_gpu_memory_gib": round(memory, 1) if memory else None,
    }


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- driver
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="toy sizes on CPU (what `make test` runs)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--only", default=None, help="comma-separated subset of the checks")
    args = parser.parse_args()
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import torch
    import transformers

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --cpu for the CPU mode)", file=sys.stderr)
        return 2
    import deepspeed

    s = {**sizes(args.cpu), "cpu": args.cpu}
    card = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in card), None)
    result: dict = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "mode": "cpu" if args.cpu else "gpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__,
        },
        "bf16_peak_tflops": peak / 1e12 if peak else None,
        "checks": {},
    }
    init_distributed(args.cpu)
    only = set(args.only.split(",")) if args.only else None
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_path, tokenizer = write_models(folder / "bert", s["bert"])
        vocab = s["bert"]["vocab_size"]
        checks = {
            "zero": lambda: check_zero(s, model_path, vocab),
            "checkpoint": lambda: check_checkpoint(s, model_path, vocab, folder / "ckpt"),
            "curriculum": lambda: check_curriculum(s, model_path, vocab),
            "zero3_save": lambda: check_zero3_save(s, model_path, vocab, tokenizer, folder / "save"),
            "encode": lambda: check_encode(s, model_path, peak),
            "search": lambda: check_search(s),
            "prefill": lambda: check_prefill(s, peak),
        }
        for name, check in checks.items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            try:
                figures = check()
            except Exception as e:  # noqa: BLE001 - one failing check must not hide the others' figures
                figures = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            figures["seconds"] = round(time.perf_counter() - t0, 1)
            result["checks"][name] = figures
            print(f"[gpu_check] {name}: {'ok' if figures['ok'] else 'FAILED'} ({figures['seconds']} s)", flush=True)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["ok"] = all(c["ok"] for c in result["checks"].values())
    line = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(line)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
