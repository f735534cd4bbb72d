"""The judge stage: qrels written by an LLM, for evaluation where there are none (or to check them).

Pooled judging as TREC does it, with an LLM as the assessor: for each query, the union of every
evaluated run's top ``judge.depth`` passages is graded 0-3 by the pointwise judge (annotate's
UMBRELA-style graded prompt), on the annotation chain's runner. The grades become qrels (with the
judge model, prompt version and pool depth as their provenance) that the evaluate stage scores every
run against beside the dataset's own qrels. When the dataset has qrels for the split, the judge's
agreement with them is measured:

- binary Cohen's kappa: relevant = judge grade >= ``judge.threshold`` against qrels grade >= the
  dataset's relevance threshold, over every judged pool passage; a passage the qrels do not name
  counts as not relevant (as the metrics count it);
- the per-grade confusion (qrels grade, or "unjudged", by judge grade), and the graded kappa over
  passages both judged.

Outputs under output_dir/judge/<dataset>-<split>/: ``pool/``, ``grades/`` (the chain's folder),
``qrels/`` (``qrels/`` table, ``agreement.json``, ``agreement.md``).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from utilrag import store
from utilrag.annotate import Chain, annotate_pools
from utilrag.annotate.engine import check_model, resolve_llm
from utilrag.annotate.prompts import PROMPT_VERSION
from utilrag.annotate.report import cohen_kappa
from utilrag.config import AnnotateConfig, JudgeConfig, JudgeTarget, PipelineConfig
from utilrag.data.dataset import Dataset, open_dataset
from utilrag.data.tables import SCHEMAS, fingerprint, read_table, write_table
from utilrag.errors import UtilragError
from utilrag.logs import get_logger
from utilrag.plan import annotator, judged_runs
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import JudgeSummary

log = get_logger("judge")

GRADES = (0, 1, 2, 3)


def judge_config(cfg: PipelineConfig, jcfg: JudgeConfig) -> AnnotateConfig:
    """The chain's settings for judging: annotate's engine and scale, the graded stage alone, greedy."""
    base = cfg.annotate or AnnotateConfig(model=jcfg.model or "")
    sampling = base.sampling.model_copy(update={"temperature": 0.0, "max_tokens": min(base.sampling.max_tokens, 64)})
    return base.model_copy(
        update={
            "model": jcfg.model or base.model,
            "stages": ["graded"],
            "graded_queries": None,
            "human_positive": "random",
            "sampling": sampling,
            "targets": [],
        }
    )


def build_pool(
    cfg: PipelineConfig, jcfg: JudgeConfig, target: JudgeTarget, dataset: Dataset
) -> tuple[pa.Table, list[str], dict]:
    """The judged pool: per query, the union of the runs' top ``depth`` (in order of best rank), with
    the qrels grade where the dataset has one; and the runs' labels and queries."""
    from utilrag.evaluate import load_run

    runs = judged_runs(cfg, target)
    if not runs:
        raise UtilragError(
            f"judge: no evaluated run of {target.dataset}/{target.split} to judge (evaluate.runs, or a train "
            "setting's runs via index.trained_targets)"
        )
    qids, _ = dataset.split_queries(target.split)
    if target.max_queries is not None and target.max_queries < len(qids):
        qids = sorted(random.Random(f"judge:{target.dataset}:{target.split}").sample(qids, target.max_queries))
    wanted = pa.array(sorted(qids), pa.string())
    best: dict[tuple[str, str], int] = {}
    for spec in runs:
        run = load_run(cfg, dataset, spec)
        run = run.filter(
            pc.and_(pc.is_in(run.column("query_id"), wanted), pc.less_equal(run.column("rank"), jcfg.depth))
        )
        for q, d, r in zip(*(run.column(c).to_pylist() for c in ["query_id", "doc_id", "rank"])):
            best[(q, d)] = min(r, best.get((q, d), r))
    qrels = dataset.qrels(target.split) if dataset.has("qrels") else SCHEMAS["qrels"].empty_table()
    grades = {(q, d): g for q, d, g in zip(*(qrels.column(c).to_pylist() for c in ["query_id", "doc_id", "grade"]))}
    rows: dict[str, list] = {n: [] for n in SCHEMAS["pools"].names}
    by_query: dict[str, list[tuple[int, str]]] = {}
    for (q, d), r in best.items():
        by_query.setdefault(q, []).append((r, d))
    for q in sorted(by_query):
        for position, (_, d) in enumerate(sorted(by_query[q])):
            for name, value in zip(rows, (q, d, position, "judge", grades.get((q, d)))):
                rows[name].append(value)
    stats = {"queries": len(by_query), "pairs": len(best), "runs": len(runs)}
    if not best:
        raise UtilragError(
            f"judge: the runs {[r.label or r.run for r in runs]} retrieve nothing for the {len(qids):,} queries of "
            f"{target.dataset}/{target.split}: no pool to judge"
        )
    return pa.table(rows, schema=SCHEMAS["pools"]), [r.label or r.run for r in runs], stats


def run_target(cfg: PipelineConfig, jcfg: JudgeConfig, target: JudgeTarget) -> tuple[str, bool]:
    """LLM qrels for one dataset split; (judge/<dataset>-<split>/qrels, reused)."""
    dataset = open_dataset(cfg, target.dataset)
    if not dataset.has("corpus"):
        raise UtilragError(f"judge: dataset {target.dataset!r} has no corpus (its runs' passages are judged)")
    acfg = judge_config(cfg, jcfg)
    layout = Store(cfg.output_dir)
    pool, labels, stats = build_pool(cfg, jcfg, target, dataset)
    pool_fp = fingerprint({"pairs": pool.select(["query_id", "doc_id", "human_grade"]).to_pydict()})
    out = layout.judge(target.dataset, target.split, "qrels")
    fp = fingerprint(
        {
            "pool": pool_fp,
            "dataset": dataset.fingerprint,
            "chain": acfg.content_settings(),
            "prompt": PROMPT_VERSION,
            "threshold": jcfg.threshold,
        }
    )
    if store.reusable(out, fp) is not None:
        log.info(f"{target.dataset}/{target.split}: unchanged, reusing {out}")
        return out, True
    labeller = annotator(cfg)
    circular = labeller is not None and acfg.model == labeller
    if circular:
        log.warning(
            f"judge: the judge is the annotator ({acfg.model}): it grades retrievers trained on its own labels, "
            "so their judged scores flatter them (circular). Set judge.model to another LLM"
        )
    pool_dir = layout.judge(target.dataset, target.split, "pool")
    if store.reusable(pool_dir, pool_fp) is None:
        writer = store.begin(pool_dir, "judge", pool_fp)
        write_table(pool, writer.path("pools.parquet"))
        writer.commit(rows={"pools": pool.num_rows}, stats=stats, runs=labels)
    model_path = resolve_llm(acfg.model)
    check_model(model_path, acfg.engine.use_gpu)
    pool_done = store.require(pool_dir, "judge: the pooled passages")
    chain = Chain(
        out=layout.judge(target.dataset, target.split, "grades"),
        paths={
            "pools": pool_done.path("pools.parquet"),
            "queries": dataset.location("queries"),
            "corpus": dataset.location("corpus"),
        },
        pools_fingerprint=pool_fp,
        key={"judge": f"{target.dataset}/{target.split}", "depth": jcfg.depth},
        label=f"{target.dataset}/{target.split} judged",
        max_queries=None,
        sample_seed=f"judge:{target.dataset}:{target.split}",
        stage="judge",
    )
    grades_dir = annotate_pools(cfg, acfg, chain, model_path)
    t0 = time.time()  # the chain's own folder has its time: this one's is turning grades into qrels
    graded = read_table(store.join(grades_dir, "graded.parquet"), ["query_id", "doc_ids", "grade"])
    judged = {
        (q, ids[0]): g for q, ids, g in zip(*(graded.column(c).to_pylist() for c in ["query_id", "doc_ids", "grade"]))
    }
    kept = [(q, d, g) for (q, d), g in judged.items() if g is not None]  # an unparsed grade: unjudged
    qrels = pa.table(
        {
            "query_id": [q for q, _, _ in kept],
            "doc_id": [d for _, d, _ in kept],
            "grade": pa.array([g for _, _, g in kept], pa.int32()),
            "split": [target.split] * len(kept),
        },
        schema=SCHEMAS["qrels"],
    )
    human = {(q, d): g for q, d, g in zip(*(pool.column(c).to_pylist() for c in ["query_id", "doc_id", "human_grade"]))}
    has_qrels = dataset.has("qrels") and dataset.qrels(target.split).num_rows > 0
    agreement = agree(judged, human, jcfg.threshold, dataset.relevance_threshold) if has_qrels else None
    if agreement is not None:  # generated questions' qrels are their source passages, not judgments
        generated = dataset.generated is not None and target.split.startswith("gen-")
        agreement["against"] = (
            "the questions' source passages (one weak positive each, not judgments)"
            if generated
            else "the dataset's qrels"
        )
    writer = store.begin(out, "judge", fp)
    write_table(qrels, writer.path("qrels/part-0.parquet"))
    staging = writer.local_path(".")
    (staging / "agreement.json").write_text(json.dumps(agreement, indent=2) + "\n")
    (staging / "agreement.md").write_text(
        render_agreement(f"{target.dataset}/{target.split}", acfg.model, agreement) + "\n"
    )
    summary = JudgeSummary(
        model=acfg.model,
        annotator=labeller,
        circular=circular,
        prompt_version=PROMPT_VERSION,
        depth=jcfg.depth,
        threshold=jcfg.threshold,
        runs=labels,
        rows={
            **stats,
            "qrels": qrels.num_rows,
            "unparsed": sum(g is None for g in judged.values()),
            "relevant": sum(g is not None and g >= jcfg.threshold for g in judged.values()),
        },
        agreement=agreement,
        wall_time_s=round(time.time() - t0, 2),
    )
    writer.commit(**summary.manifest())
    print(render_agreement(f"{target.dataset}/{target.split}", acfg.model, agreement), flush=True)
    log.info(
        f"{target.dataset}/{target.split}: {qrels.num_rows:,} judged passages of {stats['queries']:,} queries "
        f"({summary.rows['relevant']:,} graded >= {jcfg.threshold}) -> {out}"
    )
    return out, False


def agree(
    judged: dict[tuple[str, str], int | None],
    human: dict[tuple[str, str], int | None],
    threshold: int,
    human_threshold: int,
) -> dict:
    """The judge against the dataset's qrels over the judged pool (see the module's docstring)."""
    confusion: Counter = Counter()
    a, b, graded_a, graded_b = [], [], [], []
    for key, grade in judged.items():
        h = human.get(key)
        confusion[(str(h) if h is not None else "unjudged", str(grade) if grade is not None else "unparsed")] += 1
        if grade is None:
            continue
        a.append(int(h is not None and h >= human_threshold))
        b.append(int(grade >= threshold))
        if h is not None:
            graded_a.append(min(max(h, 0), 3))
            graded_b.append(grade)
    kappa = cohen_kappa(a, b, [0, 1]) if a else None
    graded = cohen_kappa(graded_a, graded_b, list(GRADES)) if graded_a else None
    return {
        "rule": f"relevant: judge grade >= {threshold} vs qrels grade >= {human_threshold}; a passage the qrels do "
        "not name counts as not relevant; unparsed judgments left out",
        "pairs": len(a),
        "kappa": None if kappa is None else round(kappa, 4),
        "agreement": round(sum(x == y for x, y in zip(a, b)) / len(a), 4) if a else None,
        "judge_relevant": sum(b),
        "qrels_relevant": sum(a),
        "graded_pairs": len(graded_a),
        "graded_kappa": None if graded is None else round(graded, 4),
        "confusion": [{"qrels": h, "judge": j, "passages": n} for (h, j), n in sorted(confusion.items())],
    }


def render_agreement(label: str, model: str, agreement: dict | None) -> str:
    if agreement is None:
        return f"LLM-judged qrels of {label} ({model}): the dataset has no qrels to compare them with"
    share = "-" if agreement["agreement"] is None else f"{agreement['agreement']:.1%}"
    lines = [
        f"LLM judge vs {agreement.get('against', 'the qrels')}: {label} ({model})",
        "",
        f"Cohen's kappa {agreement['kappa']} (binary; {agreement['rule']}), agreement "
        f"{share} over {agreement['pairs']:,} judged passages; judge relevant "
        f"{agreement['judge_relevant']:,}, qrels relevant {agreement['qrels_relevant']:,}. Graded kappa over the "
        f"{agreement['graded_pairs']:,} passages the qrels grade: {agreement['graded_kappa']}",
        "",
    ]
    judge_grades = sorted({c["judge"] for c in agreement["confusion"]})
    rows = sorted({c["qrels"] for c in agreement["confusion"]})
    cell = {(c["qrels"], c["judge"]): c["passages"] for c in agreement["confusion"]}
    lines.append("| qrels \\ judge | " + " | ".join(judge_grades) + " |")
    lines.append("|---|" + "---:|" * len(judge_grades))
    for h in rows:
        lines.append(f"| {h} | " + " | ".join(str(cell.get((h, j), 0)) for j in judge_grades) + " |")
    return "\n".join(lines)


def judged_qrels(cfg: PipelineConfig, dataset: str, split: str | None) -> tuple[pa.Table, int] | None:
    """The judge's qrels for a run's dataset split and the grade counted relevant, when the config
    judges it and the judging is committed; else None."""
    jcfg = cfg.judge
    name = split or "all"
    if jcfg is None or not any(t.dataset == dataset and t.split == name for t in jcfg.targets):
        return None
    target = next(t for t in jcfg.targets if t.dataset == dataset and t.split == name)
    folder = Store(cfg.output_dir).judge(dataset, name, "qrels")
    committed = store.require(folder, f"the judged qrels of {dataset}/{name} (run the judge stage)")
    pooled, wanted = JudgeSummary.of(committed).runs, [r.label or r.run for r in judged_runs(cfg, target)]
    if sorted(pooled) != sorted(wanted):  # a run the judge never saw would count every passage as not relevant
        raise UtilragError(
            f"the judged qrels of {dataset}/{name} pooled the runs {sorted(pooled)}, but evaluate scores "
            f"{sorted(wanted)}: "
            "run the judge stage again"
        )
    return read_table(committed.path("qrels")), jcfg.threshold


def run(cfg: PipelineConfig) -> StageResult:
    """The judge stage: every judge target."""
    t0 = time.time()
    if cfg.judge is None or not cfg.judge.targets:
        raise UtilragError("the config has no judge section with targets (judge: {targets: [{dataset, split}]})")
    done = [run_target(cfg, cfg.judge, t) for t in cfg.judge.targets]
    return StageResult("judge", [o for o, _ in done], reused=sum(r for _, r in done), wall_s=time.time() - t0)
