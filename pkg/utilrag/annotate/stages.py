"""What each stage asks the LLM (one request per query and window), how its answers are read,
and the labels table built from all of them.

A request's key is ``(query_id, window)``: the window index for listwise stages, the pool
position for the pointwise judge, 0 for the pseudo-answer.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from utilrag.annotate import prompts
from utilrag.annotate.parsing import parse_grade, parse_ids, top_percent
from utilrag.config import (
    ANNOTATION_NEEDS,
    ANNOTATION_STAGES,
    QA_METRIC_STAGE,
    QUESTION_STAGE,
    RAG_STAGE,
    AnnotateConfig,
    AnnotateTarget,
)

# the chain, defined with the config (the plan reads it); the querygen stage's questions and the RAG
# stage's answers run on it too
STAGE_ORDER, NEEDS = [*ANNOTATION_STAGES, QUESTION_STAGE, RAG_STAGE], ANNOTATION_NEEDS

REQUEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("query_id", pa.string()),
        ("window", pa.int32()),
        ("doc_ids", pa.list_(pa.string())),
        ("messages", pa.string()),
        ("passages_cut", pa.int32()),
    ]
)

STAGE_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("window", pa.int32()),
        ("doc_ids", pa.list_(pa.string())),
        ("raw_output", pa.string()),
        ("parsed", pa.list_(pa.int32())),
        ("selected", pa.list_(pa.string())),
        ("answer", pa.string()),
        ("grade", pa.int32()),
        ("prompt_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("cached_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("parse_status", pa.string()),
        ("invalid_ids", pa.int32()),
        ("repeated_ids", pa.int32()),
        ("passages_cut", pa.int32()),
        ("model", pa.string()),
        ("prompt_version", pa.string()),
        ("sampling", pa.string()),
        ("constrained", pa.bool_()),
    ]
)

LABELS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("positive", pa.bool_()),
        ("rank", pa.int32()),
        ("grade", pa.int32()),
    ]
)

REJECTS_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("reason", pa.string())])


@dataclass
class TargetInputs:
    """One dataset/split's pools with the texts the prompts need (passages already cut)."""

    pools: dict[str, list[str]]  # query id -> doc ids in pool order (what the LLM is shown)
    human: dict[str, set[str]]  # query id -> human positives in its pool
    human_grades: dict[str, dict[str, int]]  # query id -> doc id -> qrels grade (judged pool docs)
    queries: dict[str, str]
    passages: dict[str, str]
    cut: set[str]  # doc ids whose text was cut to passage_words
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (query_id, doc_id, reason)


def passage_text(title: str | None, text: str | None) -> str:
    return " ".join(part.strip() for part in (title, text) if part and part.strip())


def load_inputs(
    pools: pa.Table, queries: pa.Table, corpus_path, target: AnnotateTarget, acfg: AnnotateConfig
) -> TargetInputs:
    """Pools + texts, with bad input counted as rejects: a pool of < 2 passages or without query
    text is skipped; an empty or missing passage is left out of the prompts (a negative)."""
    by_query: dict[str, list[tuple[int, str, str, int | None]]] = defaultdict(list)
    for q, d, pos, src, g in zip(
        *(pools.column(c).to_pylist() for c in ["query_id", "doc_id", "position", "source", "human_grade"])
    ):
        by_query[q].append((pos, d, src, g))
    qids = sorted(by_query)
    if target.max_queries is not None and target.max_queries < len(qids):
        qids = sorted(random.Random(f"annotate:{target.dataset}:{target.split}").sample(qids, target.max_queries))
    texts = dict(zip(queries.column("query_id").to_pylist(), queries.column("text").to_pylist()))
    wanted = {d for q in qids for _, d, _, _ in by_query[q]}
    from utilrag import store

    fs, path = store.filesystem(str(corpus_path))
    corpus = pads.dataset(path, format="parquet", filesystem=fs).to_table(
        filter=pc.field("doc_id").isin(pa.array(sorted(wanted), pa.string()))
    )
    passages, cut = {}, set()
    max_chars = acfg.passage_words * 30  # a "word" of a megabyte is not a word
    for d, title, text in zip(*(corpus.column(c).to_pylist() for c in ["doc_id", "title", "text"])):
        short, was_cut = prompts.cut_words(passage_text(title, text), acfg.passage_words)
        if len(short) > max_chars:
            short, was_cut = short[:max_chars], True
        passages[d] = short
        if was_cut:
            cut.add(d)
    inputs = TargetInputs({}, {}, {}, {}, passages, cut)
    for q in qids:
        entries = sorted(by_query[q])
        inputs.human[q] = {d for _, d, src, _ in entries if src == "human"}
        inputs.human_grades[q] = {d: g for _, d, _, g in entries if g is not None}
        query = (texts.get(q) or "").strip()
        if not query:
            inputs.rejects.append((q, "", "missing query text"))
            continue
        shown = []
        for _, d, src, _ in entries:
            if acfg.human_positive == "exclusion" and src == "human":
                continue  # Exclusion: the human positive is removed from the pool
            if not passages.get(d):
                inputs.rejects.append((q, d, "empty passage" if d in passages else "passage not in the corpus"))
                continue
            shown.append(d)
        if len(shown) < 2:
            inputs.rejects.append((q, "", f"pool has {len(shown)} passage(s) to show (< 2)"))
            continue
        inputs.queries[q] = query
        inputs.pools[q] = shown
    return inputs


# --------------------------------------------------------------------------- requests
def _request(
    rows: dict, qid: str, window: int, doc_ids: list[str], messages: list[dict], inputs: TargetInputs, layout="paper"
):
    messages = prompts.arrange(messages, layout)
    rows["key"].append(f"{qid}\t{window}")
    rows["query_id"].append(qid)
    rows["window"].append(window)
    rows["doc_ids"].append(doc_ids)
    rows["messages"].append(json.dumps(messages, ensure_ascii=False))
    rows["passages_cut"].append(sum(d in inputs.cut for d in doc_ids))


def windows(doc_ids: list[str], size: int) -> list[list[str]]:
    return [doc_ids[i : i + size] for i in range(0, len(doc_ids), size)]


def build_requests(
    stage: str, inputs: TargetInputs, acfg: AnnotateConfig, done: dict[str, pa.Table], graded_seed: str = ""
) -> tuple[pa.Table, dict]:
    """The requests of ``stage`` given the finished earlier stages; and what was skipped why."""
    rows: dict[str, list[Any]] = {name: [] for name in REQUEST_SCHEMA.names}
    skipped: dict[str, int] = defaultdict(int)
    relsel = selections(done["relsel"]) if "relsel" in done else {}
    answers = answers_by_query(done["answer"]) if "answer" in done else {}
    qids = sorted(inputs.pools)
    if stage == "graded" and acfg.graded_queries is not None and acfg.graded_queries < len(qids):
        qids = sorted(random.Random(f"graded:{graded_seed}").sample(qids, acfg.graded_queries))
    for q in qids:
        query, pool = inputs.queries[q], inputs.pools[q]
        text = [inputs.passages[d] for d in pool]
        if stage == "relsel":
            for w, ids in enumerate(windows(pool, acfg.window)):
                _request(
                    rows,
                    q,
                    w,
                    ids,
                    prompts.relsel_messages(query, [inputs.passages[d] for d in ids]),
                    inputs,
                    acfg.layout,
                )
        elif stage == "graded":
            for position, d in enumerate(pool):
                _request(rows, q, position, [d], prompts.graded_messages(query, text[position]), inputs, acfg.layout)
        elif stage == QA_METRIC_STAGE:
            for position, d in enumerate(pool):
                _request(rows, q, position, [d], prompts.rag_messages(query, [text[position]]), inputs, acfg.layout)
        else:
            chosen = [d for d in pool if d in relsel.get(q, set())]
            if not chosen:
                skipped["no_relsel_positive"] += 1
                continue
            if stage == "answer":
                _request(
                    rows,
                    q,
                    0,
                    chosen,
                    prompts.answer_messages(query, [inputs.passages[d] for d in chosen]),
                    inputs,
                    acfg.layout,
                )
                continue
            answer = answers.get(q)
            if not answer:
                skipped["no_pseudo_answer"] += 1
                continue
            build = prompts.utilsel_messages if stage == "utilsel" else prompts.utilrank_messages
            for w, ids in enumerate(windows(chosen, acfg.window)):
                _request(rows, q, w, ids, build(query, [inputs.passages[d] for d in ids], answer), inputs, acfg.layout)
    return pa.table(rows, schema=REQUEST_SCHEMA), dict(skipped)


def stage_regex(stage: str) -> str | None:
    return {
        "relsel": prompts.SELECTION_REGEX,
        "utilsel": prompts.SELECTION_REGEX,
        "utilrank": prompts.RANKING_REGEX,
        "graded": prompts.GRADE_REGEX,
        QUESTION_STAGE: prompts.QUESTION_REGEX,
    }.get(stage)


# --------------------------------------------------------------------------- parsing outputs
def parse_output(stage: str, raw: str, doc_ids: list[str], finish_reason: str) -> dict:
    """The parsed columns of one stage row."""
    row: dict[str, Any] = {
        "parsed": [],
        "selected": [],
        "answer": None,
        "grade": None,
        "invalid_ids": 0,
        "repeated_ids": 0,
    }
    if finish_reason == "prompt_too_long":
        row["parse_status"] = "prompt_too_long"
        return row
    if stage in ("answer", RAG_STAGE, QA_METRIC_STAGE):
        row["answer"] = raw.strip()
        row["parse_status"] = "ok" if row["answer"] else "empty"
    elif stage == "graded":
        row["grade"], row["parse_status"] = parse_grade(raw)
    elif stage == QUESTION_STAGE:
        row["answer"] = prompts.clean_question(raw)
        row["parse_status"] = "ok" if row["answer"] else "empty"
    else:
        parsed = parse_ids(raw, len(doc_ids), allow_empty_selection=stage != "utilrank")
        row.update(
            parsed=parsed.ids,
            selected=[doc_ids[i - 1] for i in parsed.ids],
            parse_status=parsed.status,
            invalid_ids=parsed.invalid_ids,
            repeated_ids=parsed.repeated_ids,
        )
    return row


def selections(table: pa.Table) -> dict[str, set[str]]:
    """Query -> union of the selected doc ids over its windows."""
    out: dict[str, set[str]] = defaultdict(set)
    for q, sel in zip(table.column("query_id").to_pylist(), table.column("selected").to_pylist()):
        out[q].update(sel or [])
    return out


def answers_by_query(table: pa.Table) -> dict[str, str]:
    return {q: a for q, a in zip(table.column("query_id").to_pylist(), table.column("answer").to_pylist()) if a}


def shown_positions(table: pa.Table) -> dict[tuple[str, str], int]:
    """(query, doc) -> the [n] it was shown as in its window of a stage's requests."""
    return {
        (q, d): i + 1
        for q, ids in zip(table.column("query_id").to_pylist(), table.column("doc_ids").to_pylist())
        for i, d in enumerate(ids or [])
    }


def merged_ranking(table: pa.Table) -> dict[str, list[str]]:
    """Query -> its UtilRank order: only the ids the model ranked (as the reference code does; a
    passage it left out, or a window whose ranking did not parse, ranks nowhere). Windows are
    interleaved rank by rank. A query with nothing ranked maps to an empty list."""
    per_query: dict[str, list[tuple[int, list[str]]]] = defaultdict(list)
    for q, w, sel in zip(*(table.column(c).to_pylist() for c in ["query_id", "window", "selected"])):
        per_query[q].append((w, list(sel or [])))
    merged = {}
    for q, wins in per_query.items():
        orders = [order for _, order in sorted(wins)]
        longest = max(map(len, orders), default=0)
        merged[q] = [order[i] for i in range(longest) for order in orders if i < len(order)]
    return merged


# --------------------------------------------------------------------------- labels
def answer_score(answer: str, golds: list[str], metric: str) -> float:
    """One generated answer against a question's gold answers: the best over them (as the QA metrics)."""
    from utilrag.qa_metrics import exact_match_score, f1_score, normalize_answer, rouge_l_score

    if metric == "rouge_l":  # on SQuAD-normalised words (case, punctuation, articles), as F1 and EM are
        answer = normalize_answer(answer)
        golds = [g for g in map(normalize_answer, golds) if g]
        return rouge_l_score(answer, golds) if answer and golds else 0.0
    if not golds:  # a question without an answer (MS MARCO's "No Answer Present."): nothing answers it
        return 0.0
    score = f1_score if metric == "f1" else exact_match_score
    return max((float(score(answer, g)) for g in golds), default=0.0)


def qametric_labels(answers: dict[str, str], golds: list[str], acfg: AnnotateConfig) -> dict[str, tuple[float, int]]:
    """The QA-metric baseline's scores of one query's passages: doc id -> (its answer's score, its rank by
    score: 1 answers best; ties keep the pool order). An empty answer scores 0."""
    scores = {d: answer_score(a or "", golds, acfg.qametric.metric) for d, a in answers.items()}
    order = sorted(scores, key=lambda d: -scores[d])  # stable
    return {d: (scores[d], rank) for rank, d in enumerate(order, 1)}


def qametric_positive(score: float, best: float, acfg: AnnotateConfig) -> bool:
    rule = acfg.qametric
    if score < rule.min_score:
        return False
    return rule.rule == "threshold" or score >= best


def build_labels(
    inputs: TargetInputs,
    done: dict[str, pa.Table],
    all_pools: dict[str, list[str]],
    acfg: AnnotateConfig,
    gold_answers: dict[str, list[str]] | None = None,
) -> pa.Table:
    """One row per (query, pool passage, source): human, and each finished LLM stage. Selected
    passages are positives, every other pool passage a negative (docs/method.md §2). The QA-metric
    baseline's labels score its answers against ``gold_answers`` (query id -> answers)."""
    rows: dict[str, list[Any]] = {name: [] for name in LABELS_SCHEMA.names}

    def add(q, d, source, positive, rank=None, grade=None):
        rows["query_id"].append(q)
        rows["doc_id"].append(d)
        rows["source"].append(source)
        rows["positive"].append(bool(positive))
        rows["rank"].append(rank)
        rows["grade"].append(grade)

    llm_sets: dict[str, dict[str, set[str]]] = {}
    for stage in ("relsel", "utilsel"):
        if stage in done:
            llm_sets[stage] = selections(done[stage])
    ranks: dict[str, dict[str, int]] = {}
    if "utilrank" in done:
        llm_sets["utilrank"] = {}
        shown: dict[str, int] = defaultdict(int)  # passages UtilRank was asked to rank (the RelSel set)
        for q, ids in zip(*(done["utilrank"].column(c).to_pylist() for c in ["query_id", "doc_ids"])):
            shown[q] += len(ids or [])
        for q, order in merged_ranking(done["utilrank"]).items():
            ranks[q] = {d: i + 1 for i, d in enumerate(order)}
            # the top k% of what it was shown, among the passages it ranked; none ranked: no positive
            k = top_percent(shown[q], acfg.utilrank_top_percent) if order else 0
            llm_sets["utilrank"][q] = set(order[:k])
    grades: dict[str, dict[str, int]] = defaultdict(dict)
    if "graded" in done:
        g = done["graded"]
        for q, ids, grade in zip(*(g.column(c).to_pylist() for c in ["query_id", "doc_ids", "grade"])):
            if grade is not None:
                grades[q][ids[0]] = grade
    graded_queries = set(done["graded"].column("query_id").to_pylist()) if "graded" in done else set()
    generated: dict[str, dict[str, str]] = defaultdict(dict)  # the QA-metric stage: query -> doc -> answer
    if QA_METRIC_STAGE in done:
        g = done[QA_METRIC_STAGE]
        for q, ids, answer in zip(*(g.column(c).to_pylist() for c in ["query_id", "doc_ids", "answer"])):
            generated[q][ids[0]] = answer or ""
    for q in sorted(inputs.pools):
        pool = all_pools[q]
        human = inputs.human.get(q, set())
        for d in pool:
            add(q, d, "human", d in human, grade=inputs.human_grades.get(q, {}).get(d))
        for source, sets in llm_sets.items():
            chosen = sets.get(q, set())
            for d in pool:
                if acfg.human_positive == "exclusion" and d in human:
                    continue
                positive = d in chosen or (acfg.human_positive == "inclusion" and d in human)
                add(q, d, source, positive, rank=ranks.get(q, {}).get(d) if source == "utilrank" else None)
        if q in graded_queries:
            for d in pool:
                if acfg.human_positive == "exclusion" and d in human:
                    continue
                grade = grades[q].get(d)
                positive = (grade is not None and grade >= acfg.graded_threshold) or (
                    acfg.human_positive == "inclusion" and d in human
                )
                add(q, d, "graded", positive, grade=grade)
        if q in generated:
            scored = qametric_labels(generated[q], (gold_answers or {}).get(q, []), acfg)
            best = max((s for s, _ in scored.values()), default=0.0)
            for d in pool:
                if acfg.human_positive == "exclusion" and d in human:
                    continue
                score, rank = scored.get(d, (0.0, None))
                positive = (d in scored and qametric_positive(score, best, acfg)) or (
                    acfg.human_positive == "inclusion" and d in human
                )
                add(q, d, QA_METRIC_STAGE, positive, rank=rank)
    return pa.table(rows, schema=LABELS_SCHEMA)
