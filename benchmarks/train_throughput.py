"""Training benchmark: Ray Train + DeepSpeed (N workers x 1 core, gloo) vs a plain single-process
PyTorch loop (N threads) on the same bi-encoder, global batch and loss.

    python benchmarks/train_throughput.py [--quick] [--workers 2] [--steps 8]

Last line, one JSON object: samples/s both ways, "train_efficiency" (= ray / plain, goal >= 0.9),
peak RSS per Ray worker and of the plain process. A sample is one query with its group of passages.
Both sides call the recipe's own setup_model_and_engine / train_step (DeepSpeed ZeRO-2), so the
difference is what Ray Train and data parallelism cost or gain.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))


def synthetic_batch(queries: int, group: int, q_len: int, p_len: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    positives = torch.zeros(queries, group, dtype=torch.bool)
    positives[:, 0] = True
    return {
        "q_ids": torch.randint(1000, vocab, (queries, q_len), generator=g),
        "q_mask": torch.ones(queries, q_len, dtype=torch.long),
        "p_ids": torch.randint(1000, vocab, (queries, group, p_len), generator=g),
        "p_mask": torch.ones(queries, group, p_len, dtype=torch.long),
        "positives": positives,
    }


def timed_steps(engine, tcfg, batches) -> float:
    from utilrag.train.recipe import train_step

    train_step(engine, batches[0], tcfg)  # warm-up (allocations, DeepSpeed buckets)
    t0 = time.perf_counter()
    for batch in batches[1:]:
        train_step(engine, batch, tcfg)
    return time.perf_counter() - t0


def profiled_steps(engine, tcfg, batches) -> dict:
    """Where a step's time goes: forward + loss, backward (ZeRO's gradient reduction runs inside
    it), optimizer step (ZeRO-1/2: the updated partitions' all-gather too), and a bare all-reduce
    of a gradient-sized fp32 buffer on the same process group."""
    import torch
    import torch.distributed as dist

    from utilrag.train.loss import contrastive_scores, loss_for

    times = {"forward_s": 0.0, "backward_s": 0.0, "step_s": 0.0}
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        b, g, p_len = batch["p_ids"].shape
        q, p = engine(
            batch["q_ids"], batch["q_mask"], batch["p_ids"].reshape(b * g, p_len), batch["p_mask"].reshape(b * g, p_len)
        )
        scores, mask = contrastive_scores(q.float(), p.float(), batch["positives"].bool(), tcfg.temperature)
        loss = loss_for(tcfg.loss, tcfg.positives)(scores, mask)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if i:  # the first step is the warm-up
            times["forward_s"] += t1 - t0
            times["backward_s"] += t2 - t1
            times["step_s"] += t3 - t2
    params = sum(p.numel() for p in engine.module.parameters())
    buffer = torch.zeros(params)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(buffer)
        t0 = time.perf_counter()
        for _ in range(3):
            dist.all_reduce(buffer)
        times["allreduce_grad_sized_s"] = (time.perf_counter() - t0) / 3
    times["params"] = params
    return times


def ray_worker(config: dict) -> None:
    import ray.train
    import torch

    from utilrag.config import TrainConfig
    from utilrag.train.recipe import setup_model_and_engine

    tcfg = TrainConfig(**config["train"])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rank = ray.train.get_context().get_world_rank()
    _, engine = setup_model_and_engine(tcfg, config["model_path"], config["steps"] + 1)
    batches = [
        synthetic_batch(
            tcfg.per_device_queries,
            tcfg.group_size,
            tcfg.query_max_len,
            tcfg.passage_max_len,
            config["vocab"],
            seed=100 * rank + s,
        )
        for s in range(config["steps"] + 1)
    ]
    seconds = timed_steps(engine, tcfg, batches)
    figures = {"seconds": seconds, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if config["profile"]:
        figures["profile"] = profiled_steps(engine, tcfg, batches)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(figures))
    ray.train.report(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run; under 5 minutes on 2 cores")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--queries-per-worker", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--p-len", type=int, default=64)
    parser.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage of both sides")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also time forward / backward / step per rank and a bare gradient all-reduce",
    )
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 12)

    import os
    import tempfile

    import ray
    import torch
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from utilrag.config import TrainConfig
    from utilrag.encoder_spec import resolve_model

    model_path = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    tcfg = TrainConfig(
        model=model_path,
        pooling="mean",
        normalize=True,
        temperature=0.05,
        query_max_len=32,
        passage_max_len=args.p_len,
        group_size=args.group,
        per_device_queries=args.queries_per_worker,
        num_workers=args.workers,
        deepspeed_zero_stage=args.zero,
        checkpoint_every_s=1e9,
    )
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_path).vocab_size
    samples = steps * args.queries_per_worker * args.workers

    # Plain loop: one process, all cores, the whole global batch per step (DeepSpeed single rank).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(args.workers)
    torch.manual_seed(0)
    from utilrag.train.recipe import setup_model_and_engine

    plain_cfg = tcfg.model_copy(update={"per_device_queries": args.queries_per_worker * args.workers, "num_workers": 1})
    _, engine = setup_model_and_engine(plain_cfg, model_path, steps + 1)
    batches = [
        synthetic_batch(plain_cfg.per_device_queries, args.group, 32, args.p_len, vocab, seed=s)
        for s in range(steps + 1)
    ]
    plain_seconds = timed_steps(engine, plain_cfg, batches)
    plain_profile = profiled_steps(engine, plain_cfg, batches) if args.profile else None
    plain_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del engine
    torch.distributed.destroy_process_group()

    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={
                "train": tcfg.model_dump(),
                "model_path": model_path,
                "steps": steps,
                "vocab": vocab,
                "out": tmp,
                "profile": args.profile,
            },
            scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                storage_path=tmp,
                name="bench",
                worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}},
            ),
            dataset_config=DataConfig(datasets_to_split=[]),
            torch_config=TorchConfig(backend="gloo"),
        )
        trainer.fit()
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.workers)]
    ray_seconds = max(r["seconds"] for r in ranks)  # a step ends when the slowest rank ends it
    plain_sps, ray_sps = samples / plain_seconds, samples / ray_seconds
    out = {
        "workers": args.workers,
        "steps": steps,
        "global_batch_queries": args.queries_per_worker * args.workers,
        "group": args.group,
        "p_len": args.p_len,
        "model": "all-MiniLM-L6-v2",
        "zero_stage": args.zero,
        "plain_samples_per_s": round(plain_sps, 3),
        "ray_deepspeed_samples_per_s": round(ray_sps, 3),
        "train_efficiency": round(ray_sps / plain_sps, 3),
        "peak_rss_mib_ray_workers": [round(r["max_rss_mib"]) for r in ranks],
        "peak_rss_mib_plain": round(plain_rss),
    }
    if args.profile:
        per_step = max(1, steps)  # profiled steps after the warm-up
        out["profile_s_per_step"] = {
            "plain": {k: round(v / per_step, 4) for k, v in plain_profile.items() if k.endswith("_s")},
            **{
                f"rank{r}": {
                    k: round(v / per_step, 4) if k != "allreduce_grad_sized_s" else round(v, 4)
                    for k, v in ranks[r]["profile"].items()
                    if k.endswith("_s")
                }
                for r in range(args.workers)
            },
        }
    print(f"plain {plain_sps:.2f} samples/s vs Ray Train + DeepSpeed {ray_sps:.2f} samples/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
