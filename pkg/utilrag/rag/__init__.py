"""RAG stage (docs/method.md §5): for a sample of an ingested QA dataset's questions, give the
generator the top-k passages of each configured run (BM25 or dense; over the QA set's own passages or
another dataset's corpus, ``rag.corpus``), plus a closed-book floor and an oracle ceiling; generate
greedily on the annotation chain's runner (a one-stage chain: each question and setting is one chain
query; the same replicas, exactly-once parts, engine-death handling and error rows); score answers with
the official SQuAD v1.1 EM/F1 and retrieval with recall@k against the gold passages and answer recall@k.

Outputs: output_dir/rag/<dataset>/generate/ (the chain's inputs/ and chain.parts/, ``rag.parquet``: one
row per generation, ``errors.parquet``) and output_dir/rag/<dataset>/report/ (per_query.parquet,
results.{md,csv,json}, f1.png, significance).
"""

from __future__ import annotations

import json
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from utilrag import lease, store
from utilrag.annotate import job
from utilrag.annotate.engine import check_model, resolve_llm
from utilrag.annotate.prepare import INPUT_SCHEMA
from utilrag.annotate.prompts import RAG_PROMPT_VERSION, cut_words, rag_messages
from utilrag.config import RAG_STAGE, AnnotateConfig, BertScoreConfig, PipelineConfig, RagConfig, RunToEvaluate
from utilrag.data.dataset import Dataset, open_dataset
from utilrag.data.tables import fingerprint, read_table
from utilrag.errors import UtilragError
from utilrag.evaluate import load_run
from utilrag.evaluate.significance import format_paired_tests, paired_tests
from utilrag.logs import get_logger
from utilrag.qa_metrics import (
    answer_recall,
    bert_score_f1,
    bert_scorer,
    exact_match_score,
    f1_score,
    marco_evaluate,
)
from utilrag.raycluster import connect
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import RagSummary

log = get_logger("rag")


class RagError(UtilragError):
    """A RAG configuration or input problem (one line, exit 2)."""


def rag_config(cfg: PipelineConfig) -> RagConfig:
    if cfg.rag is None:
        raise RagError("the config has no rag section (rag: {dataset, model, retrievers: [{run}]})")
    return cfg.rag


def sample_questions(qa: pa.Table, rcfg: RagConfig) -> pa.Table:
    ids = sorted(qa.column("query_id").to_pylist())
    if rcfg.max_questions is not None and rcfg.max_questions < len(ids):
        ids = sorted(random.Random(rcfg.seed).sample(ids, rcfg.max_questions))
    wanted = set(ids)
    keep = [q in wanted for q in qa.column("query_id").to_pylist()]
    return qa.filter(pa.array(keep)).sort_by("query_id")


def corpus_questions(dataset: Dataset, rcfg: RagConfig) -> pa.Table:
    """A dataset without a qa table (your own corpus): the questions of ``rag.split`` as a qa table with no
    answers, their qrels passages (a generated question's source passage) as the gold passages."""
    qids, texts = dataset.split_queries(rcfg.split)
    gold: dict[str, list[str]] = {}
    qrels = dataset.qrels(rcfg.split)
    for q, d, g in zip(*(qrels.column(c).to_pylist() for c in ["query_id", "doc_id", "grade"])):
        if g >= dataset.relevance_threshold:
            gold.setdefault(q, []).append(d)
    if not qids:
        raise RagError(f"rag: dataset {dataset.name!r} has no questions in split {rcfg.split!r}")
    table = pa.table(
        {
            "query_id": qids,
            "question": texts,
            "answers": pa.array([[] for _ in qids], pa.list_(pa.string())),
            "gold_doc_ids": pa.array([sorted(gold.get(q, [])) for q in qids], pa.list_(pa.string())),
        }
    )
    return sample_questions(table, rcfg)


def answers_of(questions: pa.Table) -> dict[str, list[str]]:
    """Question id -> its gold answers (the qa table's)."""
    return dict(zip(questions.column("query_id").to_pylist(), questions.column("answers").to_pylist()))


def oracle_references(rows: list[dict], generated: pa.Table) -> dict[str, list[str]]:
    """Without gold answers: each question's reference is the generator's answer from its gold (source)
    passage, the oracle row's; a question whose oracle answer is empty has none (scored 0, as SQuAD's)."""
    index = next(i for i, row in enumerate(rows) if row["gold"])
    refs: dict[str, list[str]] = {q: [] for q in rows[index]["docs"]}
    for q, w, a in zip(*(generated.column(c).to_pylist() for c in ["query_id", "window", "answer"])):
        if w == index and a:
            refs[q] = [a]
    return refs


def settings(cfg: PipelineConfig, dataset: Dataset, questions: pa.Table) -> list[dict]:
    """Every row of the report: its label, k, and the passages (doc ids) each question gets."""
    rcfg = rag_config(cfg)
    qids = questions.column("query_id").to_pylist()
    golds = dict(zip(qids, questions.column("gold_doc_ids").to_pylist()))
    rows: list[dict] = []
    if rcfg.closed_book:
        rows.append({"label": "closed-book", "run": None, "k": 0, "docs": {q: [] for q in qids}, "gold": False})
    for retriever in rcfg.retrievers:
        run = load_run(cfg, dataset, RunToEvaluate(dataset=dataset.name, split=rcfg.split, run=retriever.run))
        ranked: dict[str, list[tuple[int, str]]] = {}
        for q, d, r in zip(*(run.column(c).to_pylist() for c in ["query_id", "doc_id", "rank"])):
            ranked.setdefault(q, []).append((r, d))
        missing = [q for q in qids if q not in ranked]
        if len(missing) == len(qids):
            raise RagError(f"rag: run {retriever.run!r} has none of the sampled questions of {dataset.name!r}")
        order = {q: [d for _, d in sorted(v)] for q, v in ranked.items()}
        for k in rcfg.k:
            rows.append(
                {
                    "label": retriever.label or retriever.run,
                    "run": retriever.run,
                    "k": k,
                    "docs": {q: order.get(q, [])[:k] for q in qids},
                    "gold": False,  # the retrieved corpus's passages
                }
            )
    if rcfg.oracle:
        if not any(golds.values()):
            raise RagError(f"rag: {dataset.name!r} has no gold passages; set rag.oracle=false")
        # the QA set's own gold passage (of rag.dataset's corpus, whatever rag.corpus is)
        rows.append({"label": "oracle", "run": None, "k": 1, "docs": {q: golds[q][:1] for q in qids}, "gold": True})
    return rows


def row_passages(rows: list[dict], corpus: Dataset, own: Dataset) -> list[dict[str, str]]:
    """Per row, the text of every passage it gives the generator: retrieved ones from the searched corpus,
    the oracle's from the QA set's own passages (two corpora may reuse ids). Only those passages are read."""
    wanted: dict[bool, set[str]] = {False: set(), True: set()}
    for row in rows:
        for docs in row["docs"].values():
            wanted[row["gold"]].update(docs)
    retrieved = corpus.passages(wanted[False])
    gold = own.passages(wanted[True]) if corpus is not own else retrieved | own.passages(wanted[True] - set(retrieved))
    missing = next((d for d in wanted[False] if d not in retrieved), None)
    if missing is not None:
        raise RagError(f"rag: retrieved passage {missing!r} is not in the corpus of {corpus.name!r}")
    return [gold if row["gold"] else retrieved for row in rows]


def chain_inputs(questions: pa.Table, rows: list[dict], passages: list[dict[str, str]], words: int) -> pa.Table:
    """The chain's inputs: one query per (question, report row), id ``<question id>\t<row index>``, its
    passages cut to ``words`` (none for the closed-book row)."""
    out: dict[str, list[Any]] = {name: [] for name in INPUT_SCHEMA.names}
    texts = dict(zip(questions.column("query_id").to_pylist(), questions.column("question").to_pylist()))
    for index, (row, texts_of) in enumerate(zip(rows, passages)):
        for q, docs in row["docs"].items():
            cut = [cut_words(texts_of[d], words) for d in docs]
            values = {
                "query_id": f"{q}\t{index}",
                "part": 0,
                "annotate": True,
                "query": texts[q],
                "doc_ids": list(docs),
                "passages": [t for t, _ in cut],
                "cut": [c for _, c in cut],
                "all_pool": list(docs),
                "human": [],
                "judged": [],
                "judged_grades": [],
                "rejects": [],
            }
            for name in INPUT_SCHEMA.names:
                out[name].append(values[name])
    return pa.table(out, schema=INPUT_SCHEMA)


def prompts_fingerprint(inputs: pa.Table) -> str:
    """What the generator is asked: every chain query's prompt."""
    return fingerprint(
        [
            json.dumps(rag_messages(q, p), ensure_ascii=False)
            for q, p in zip(inputs.column("query").to_pylist(), inputs.column("passages").to_pylist())
        ]
    )


def generate(
    cfg: PipelineConfig, acfg: AnnotateConfig, inputs: pa.Table, folder: str, fp: str, model_path: str, label: str
):
    """The answers of every chain query (a one-stage chain in ``folder``); returns the stage table (by
    question and row) and its summary. An error row (a generation whose requests kept failing) has no
    answer; above ``scale.max_error_fraction`` of them the stage fails."""
    t0 = time.time()
    with lease.holding(store.normalize(folder), "rag"):
        job.write_inputs(folder, fp, inputs, label)
        chain_fp = fingerprint({"inputs": fp, "settings": acfg.content_settings(), "stages": [RAG_STAGE]})
        run = job.new_run_id()
        ray_up = partial(connect, cfg.ray)  # Ray only for work left: finished generations start no cluster
        stats = job.run_chain(folder, chain_fp, acfg, model_path, label, None, run, None, ray_up)
        errors_path = store.join(folder, "errors.parquet")
        tallies, _, _, errors = job.finalize(folder, None, errors_path, acfg, run)
        summary = job.stage_summaries(tallies, time.time() - t0, stats.get("engine_s"))[RAG_STAGE]
        summary["error_rows"] = sum(errors.values())
        summary["engines"] = job.replica_figures(stats)
        log.info(f"{label}: {job.summary_line(summary)}")
        if summary["error_rows"]:
            log.info(f"{label}: {summary['error_rows']:,} generations failed -> {errors_path}")
            over = job.over_error_budget(
                label,
                summary["error_rows"],
                inputs.num_rows,
                acfg.scale.max_error_fraction,
                errors_path,
                "rag.scale.max_error_fraction",
            )
            if over:
                raise RagError(over)
        return by_setting(read_table(store.join(folder, f"{RAG_STAGE}.parquet"))), summary


def by_setting(table: pa.Table) -> pa.Table:
    """The stage table's chain query ids (``<question id>\t<row index>``) as question id and row index
    (``window``): what ``score`` reads."""
    split = pc.split_pattern(table.column("query_id"), "\t", max_splits=1, reverse=True)  # the row: after the last
    table = table.set_column(0, "query_id", pc.list_element(split, 0))
    return table.set_column(
        table.schema.get_field_index("window"), "window", pc.cast(pc.list_element(split, 1), pa.int32())
    )


def score(
    questions: pa.Table,
    rows: list[dict],
    generated: pa.Table,
    passages: list[dict[str, str]],
    same_ids: bool = True,
    references: dict[str, list[str]] | None = None,
) -> list[dict]:
    """One record per (row, question): EM, F1, recall@k (``same_ids``: the runs' passages are the QA set's
    own, so its gold ids can be found among them), answer recall@k, tokens, finish reason. ``references``:
    the oracle row's answers standing in for gold answers (a corpus without them): that row and answer
    recall (a sentence is not a span to find) are then not scored."""
    answers = references or answers_of(questions)
    golds = dict(zip(questions.column("query_id").to_pylist(), questions.column("gold_doc_ids").to_pylist()))
    by_key = {
        (q, w): (a, o, f)
        for q, w, a, o, f in zip(
            *(
                generated.column(c).to_pylist()
                for c in ["query_id", "window", "answer", "output_tokens", "finish_reason"]
            )
        )
    }
    records = []
    for index, (row, texts_of) in enumerate(zip(rows, passages)):
        for q, docs in row["docs"].items():
            # an error row (its requests kept failing: errors.parquet) answers nothing
            prediction, tokens, finish = by_key.get((q, index), ("", 0, "error"))
            prediction = prediction or ""
            gold_answers = answers[q] or []
            unscored = references is not None and row["gold"]  # the reference itself
            em = None if unscored else max((float(exact_match_score(prediction, g)) for g in gold_answers), default=0.0)
            f1 = None if unscored else max((f1_score(prediction, g) for g in gold_answers), default=0.0)
            gold_docs = set(golds[q] or [])
            records.append(
                {
                    "label": row["label"],
                    "k": row["k"],
                    "query_id": q,
                    "prediction": prediction,
                    "exact_match": em,
                    "f1": f1,
                    "recall": (
                        float(bool(gold_docs & set(docs)))
                        if gold_docs and row["k"] and (same_ids or row["gold"])
                        else None
                    ),
                    "answer_recall": (
                        float(answer_recall([texts_of[d] for d in docs], gold_answers))
                        if row["k"] and references is None
                        else None
                    ),
                    "output_tokens": tokens,
                    "finish_reason": finish,
                }
            )
    return records


MEANS = {"recall@k": "recall", "answer_recall@k": "answer_recall", "exact_match": "exact_match", "f1": "f1"}


def _percent(records: list[dict], key: str) -> float | None:
    """Mean in percent over the records that have the value (recall needs passages and gold ids)."""
    values = [r[key] for r in records if r[key] is not None]
    return 100 * sum(values) / len(values) if values else None


def summarise(
    records: list[dict], rows: list[dict], answers: dict[str, list[str]], bertscore: BertScoreConfig | None = None
) -> list[dict]:
    """One line per row: means in percent, ROUGE-L / BLEU-3 / BLEU-4 as MS MARCO QnA scores them and,
    when configured, BERTScore F1 (the paper's MS MARCO QA metrics; over the questions that have an answer)."""
    table = []
    for row in rows:
        mine = [r for r in records if r["label"] == row["label"] and r["k"] == row["k"]]
        scored = any(r["f1"] is not None for r in mine)  # not the reference row of a corpus without answers
        refs = {r["query_id"]: (answers[r["query_id"]] or []) if scored else [] for r in mine}
        marco = marco_evaluate(refs, {r["query_id"]: r["prediction"] for r in mine}) if any(refs.values()) else None
        table.append(
            {
                "retriever": row["label"],
                "k": row["k"],
                **{name: _percent(mine, key) for name, key in MEANS.items()},
                "rouge_l": 100 * marco["rouge_l"] if marco else None,
                "bleu_3": 100 * marco["bleu_3"] if marco else None,
                "bleu_4": 100 * marco["bleu_4"] if marco else None,
                "bertscore": _bertscore(refs, mine, bertscore),
                "n": len(mine),
            }
        )
    return table


def _bertscore(refs: dict[str, list[str]], mine: list[dict], bcfg: BertScoreConfig | None) -> float | None:
    if bcfg is None or not any(refs.values()):
        return None
    predictions = {r["query_id"]: r["prediction"] for r in mine}
    f1 = bert_score_f1(refs, predictions, bcfg.model, bcfg.num_layers, bcfg.batch_size)
    return None if f1 is None else 100 * f1


def format_results(table: list[dict]) -> str:
    def cell(v) -> str:
        return "–" if v is None else f"{v:.1f}"

    lines = [
        "| retriever | k | recall@k | answer recall@k | EM | F1 | ROUGE-L | BLEU-3 | BLEU-4 | BERTScore | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['retriever']} | {r['k']} | {cell(r['recall@k'])} | {cell(r['answer_recall@k'])} | "
            f"{cell(r['exact_match'])} | {cell(r['f1'])} | {cell(r['rouge_l'])} | {cell(r.get('bleu_3'))} | "
            f"{cell(r['bleu_4'])} | {cell(r.get('bertscore'))} | {r['n']} |"
        )
    return "\n".join(lines)


def significance(records: list[dict], rows: list[dict], rcfg: RagConfig) -> list[dict]:
    """Each row's per-question F1 and EM against the baseline row: paired t-test and randomisation test."""
    base = next((r for r in rows if r["label"] == rcfg.baseline), None)
    if base is None:
        return []
    values: dict[tuple, dict[str, float]] = {}
    for r in records:
        for metric in ("f1", "exact_match"):
            if r[metric] is not None:
                values.setdefault((r["label"], r["k"], metric), {})[r["query_id"]] = r[metric]
    if (base["label"], base["k"], "f1") not in values:  # the baseline is the unscored reference row
        return []
    tests = []
    for row in rows:
        if row is base or (row["label"], row["k"], "f1") not in values:
            continue
        for metric in ("f1", "exact_match"):
            result = paired_tests(
                values[(base["label"], base["k"], metric)], values[(row["label"], row["k"], metric)], rcfg.permutations
            )
            tests.append({"retriever": row["label"], "k": row["k"], "metric": metric, **result})
    return tests


def plot_f1(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['retriever']} k={r['k']}" for r in table]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(table) + 1.2))
    ax.barh(range(len(table)), [r["f1"] or 0 for r in table], color="#4C72B0", label="F1")
    ax.barh(range(len(table)), [r["exact_match"] or 0 for r in table], color="#DD8452", height=0.4, label="EM")
    ax.set_yticks(range(len(table)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("score (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: PipelineConfig) -> StageResult:
    """The RAG stage."""
    t0 = time.time()
    rcfg = rag_config(cfg)
    dataset = open_dataset(cfg, rcfg.dataset)
    has_answers = dataset.has("qa")
    if not has_answers and not rcfg.oracle:
        raise RagError(
            f"rag: dataset {rcfg.dataset!r} has no answers (no qa table): its questions are scored against the "
            "answer from each one's source passage, the oracle row; set rag.oracle: true (or ingest a QA set)"
        )
    model_path = resolve_llm(rcfg.model)
    check_model(model_path, rcfg.engine.use_gpu)
    if rcfg.bertscore is not None:  # loaded before the generations: a model that cannot load fails first
        bert_scorer(rcfg.bertscore.model, rcfg.bertscore.num_layers, rcfg.bertscore.batch_size)
    questions = sample_questions(dataset.table("qa"), rcfg) if has_answers else corpus_questions(dataset, rcfg)
    corpus = open_dataset(cfg, rcfg.corpus) if rcfg.corpus and rcfg.corpus != rcfg.dataset else dataset
    rows = settings(cfg, dataset, questions)
    passages = row_passages(rows, corpus, dataset)
    inputs = chain_inputs(questions, rows, passages, rcfg.passage_words)
    log.info(
        f"{rcfg.dataset}: {questions.num_rows:,} questions"
        + (f" over {corpus.name!r}'s passages" if corpus is not dataset else "")
        + f" x {len(rows)} settings "
        f"({', '.join(row['label'] + '@' + str(row['k']) for row in rows)}) = {inputs.num_rows:,} generations"
    )
    acfg = AnnotateConfig(
        model=rcfg.model,
        passage_words=rcfg.passage_words,
        sampling=rcfg.sampling.model_dump(),
        engine=rcfg.engine,
        scale=rcfg.scale,
    ).model_copy(update={"stages": [RAG_STAGE]})
    layout = Store(cfg.output_dir)
    generate_dir = layout.rag(rcfg.dataset, "generate")
    fp = fingerprint(
        {
            "dataset": dataset.fingerprint,
            **({"corpus": corpus.fingerprint} if corpus is not dataset else {}),
            "requests": prompts_fingerprint(inputs),
            "prompt_version": RAG_PROMPT_VERSION,
            "settings": acfg.content_settings(),
        }
    )
    generated, summary = generate(cfg, acfg, inputs, generate_dir, fp, model_path, f"rag {rcfg.dataset}")

    references = None if has_answers else oracle_references(rows, generated)
    if references is not None:
        log.info(
            f"{rcfg.dataset}: no gold answers: every row is scored against the answer from each question's source "
            "passage (the oracle row's)"
        )
    records = score(questions, rows, generated, passages, corpus is dataset, references)
    answers = references or answers_of(questions)
    table = summarise(records, rows, answers, rcfg.bertscore)
    tests = significance(records, rows, rcfg)
    text = format_results(table)
    if tests:
        text += "\n\n" + format_significance(tests, rcfg.baseline or "")
    writer = store.begin(layout.rag(rcfg.dataset, "report"), "rag", fp)
    out = writer.local_path(".")
    pq.write_table(pa.Table.from_pylist(records), out / "per_query.parquet")
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.Table.from_pylist(table), out / "results.csv")
    if tests:
        pq.write_table(pa.Table.from_pylist(tests), out / "significance.parquet")
    plot_f1(table, out / "f1.png")
    writer.commit(
        **RagSummary(
            results=table,
            generation=summary,
            references="gold" if references is None else "oracle",
            wall_time_s=round(time.time() - t0, 2),
        ).manifest()
    )
    print(text, flush=True)
    return StageResult("rag", [writer.folder, generate_dir], {"generations": inputs.num_rows}, wall_s=time.time() - t0)


def format_significance(tests: list[dict], baseline: str) -> str:
    columns = [("retriever", "retriever"), ("k", "k"), ("metric", "metric")]
    return format_paired_tests(tests, baseline, columns, delta_scale=100)
