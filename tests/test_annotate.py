"""Annotation: prompts, parsing, labels and the agreement report (plain Python); then real vLLM
engines on a real Ray cluster with a tiny random-weight Llama (a real model's judgments are the
local run's job, not a unit test's): a driver SIGKILLed mid-stage and rerun, a replica that dies
mid-batch, an engine that cannot start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from readiness import wait_until
from utilrag.annotate import prompts
from utilrag.annotate.engine import AnnotateError, check_model, resolve_llm
from utilrag.annotate.parsing import parse_grade, parse_ids, top_percent
from utilrag.annotate.report import agreement, agreement_by_position, cohen_kappa, graded_kappa
from utilrag.annotate.stages import (
    STAGE_SCHEMA,
    TargetInputs,
    build_labels,
    build_requests,
    load_inputs,
    merged_ranking,
    shown_positions,
    windows,
)
from utilrag.annotate.tiny import make_tiny_llm, qwen_tokenizer_dir
from utilrag.config import AnnotateConfig, AnnotateTarget

# --------------------------------------------------------------------------- prompts and parsing
from utilrag.paths import REPO_ROOT


def test_relsel_prompt_is_the_papers_multi_turn_chat():
    messages = prompts.relsel_messages("what is a cat", ["Cats purr.", "Dogs bark."])
    assert [m["role"] for m in messages] == ["user", "assistant"] * 4 + ["user"]
    assert messages[0]["content"] == (
        "You are the relevance judger, an intelligent assistant that can select the "
        "passages that are relevant to the question."
    )
    assert messages[2]["content"] == (
        "I will provide you with 2 passages, each indicated by number identifier []. \n"
        "Select the passages that are relevant to the question: what is a cat."
    )
    assert messages[4:8] == [
        {"role": "user", "content": "[1] Cats purr."},
        {"role": "assistant", "content": "Received passage [1]."},
        {"role": "user", "content": "[2] Dogs bark."},
        {"role": "assistant", "content": "Received passage [2]."},
    ]
    assert messages[-1]["content"].startswith("Search Query: what is a cat. \nDirectly output the passages")
    assert messages[-1]["content"].endswith(
        "'My selection:[[i],[j],...].'. Only response the selection results, do not say any word or explain."
    )
    util = prompts.utilrank_messages("q", ["a", "b", "c"], "ans")
    assert util[-1]["content"].startswith("Question: q. \n\n Reference answer: ans\n\n Rank the 3 passages above")
    answer = prompts.answer_messages("q", ["a", "b"])
    assert answer[-1]["content"] == (
        "Given the information: \n[1] a\n[2] b\n Answer the following question based on "
        "the given information with one or few sentences without the source.\n "
        "Question: q\n\n Answer:"
    )


def test_prompts_render_with_a_real_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_qwen_tokenizer_dir())
    text = tokenizer.apply_chat_template(
        prompts.utilsel_messages("q?", ["alpha", "beta"], "an answer"), tokenize=False, add_generation_prompt=True
    )
    assert text.count("<|im_start|>user") == 5 and text.count("<|im_start|>assistant") == 5  # 4 turns + generation
    assert "[2] beta" in text and "Reference answer: an answer." in text


def test_cut_words_records_the_cut():
    assert prompts.cut_words("a  b\nc", 3) == ("a b c", False)
    assert prompts.cut_words(" ".join(["w"] * 301), 300) == (" ".join(["w"] * 300), True)


@pytest.mark.parametrize(
    "text,num,ids,status,invalid,repeated",
    [
        ("My selection:[[3],[1],[3],[40]].", 16, [3, 1], "ok", 1, 1),
        ("My selection:[].", 16, [], "ok", 0, 0),
        ("Received passage [17].", 16, [], "no_valid_ids", 1, 0),
        ("I cannot tell.", 16, [], "unparsed", 0, 0),
        ("[2] > [1] > [2] > [0]", 2, [2, 1], "ok", 1, 1),
    ],
)
def test_parse_ids(text, num, ids, status, invalid, repeated):
    parsed = parse_ids(text, num)
    assert (parsed.ids, parsed.status, parsed.invalid_ids, parsed.repeated_ids) == (ids, status, invalid, repeated)


def test_parse_grade_and_top_percent():
    assert parse_grade("##final score: 2") == (2, "ok")
    assert parse_grade("M: 2, T: 1\n##Final Score: **3**") == (3, "ok")
    assert parse_grade("1") == (1, "ok")
    assert parse_grade("very relevant") == (None, "unparsed")
    assert [top_percent(n, 10) for n in (1, 5, 9, 10, 31)] == [1, 1, 1, 1, 3]
    assert [len(w) for w in windows(list(range(31)), 16)] == [16, 15]


# --------------------------------------------------------------------------- inputs, labels, report
def _inputs() -> tuple[TargetInputs, dict[str, list[str]]]:
    pools = {"q1": ["a", "b", "c", "d"], "q2": ["e", "f", "g"]}
    inputs = TargetInputs(
        pools={q: list(v) for q, v in pools.items()},
        human={"q1": {"a"}, "q2": {"f"}},
        human_grades={"q1": {"a": 3, "b": 0}, "q2": {"f": 2, "g": 1}},
        queries={"q1": "one", "q2": "two"},
        passages={d: d * 3 for d in "abcdefg"},
        cut=set(),
    )
    return inputs, pools


def _stage_table(rows: list[dict]) -> pa.Table:
    full = [{**{name: None for name in STAGE_SCHEMA.names}, **r} for r in rows]
    return pa.Table.from_pylist(full, schema=STAGE_SCHEMA)


def test_requests_follow_the_stage_chain():
    inputs, _ = _inputs()
    acfg = AnnotateConfig(model="m", window=3)
    relsel_requests, _ = build_requests("relsel", inputs, acfg, {})
    assert relsel_requests.column("key").to_pylist() == ["q1\t0", "q1\t1", "q2\t0"]  # 4 passages -> 3 + 1
    done = {
        "relsel": _stage_table(
            [
                {"query_id": "q1", "window": 0, "selected": ["b", "a"]},
                {"query_id": "q1", "window": 1, "selected": []},
                {"query_id": "q2", "window": 0, "selected": []},
            ]
        )
    }
    answer, skipped = build_requests("answer", inputs, acfg, done)
    assert answer.column("doc_ids").to_pylist() == [["a", "b"]] and skipped == {"no_relsel_positive": 1}
    done["answer"] = _stage_table([{"query_id": "q1", "window": 0, "answer": "A."}])
    utilsel, _ = build_requests("utilsel", inputs, acfg, done)
    assert utilsel.column("doc_ids").to_pylist() == [["a", "b"]]
    assert "Reference answer: A.." in utilsel.column("messages").to_pylist()[0]
    graded, _ = build_requests("graded", inputs, acfg.model_copy(update={"graded_queries": 1}), done)
    chosen = set(graded.column("query_id").to_pylist())
    assert len(chosen) == 1  # graded_queries=1: one seeded query, one prompt per passage of its pool
    assert graded.num_rows == len(inputs.pools[chosen.pop()])


def test_labels_with_the_papers_options():
    inputs, pools = _inputs()
    done = {
        "relsel": _stage_table(
            [
                {"query_id": "q1", "window": 0, "doc_ids": ["a", "b", "c", "d"], "selected": ["b", "a"]},
                {"query_id": "q2", "window": 0, "doc_ids": ["e", "f", "g"], "selected": ["e"]},
            ]
        ),
        "utilsel": _stage_table([{"query_id": "q1", "window": 0, "doc_ids": ["a", "b"], "selected": ["b"]}]),
        # two ranking windows: [c, a] ranked, b left out; [d] ranked; q2's ranking did not parse
        "utilrank": _stage_table(
            [
                {"query_id": "q1", "window": 0, "doc_ids": ["a", "b", "c"], "selected": ["c", "a"]},
                {"query_id": "q1", "window": 1, "doc_ids": ["d"], "selected": ["d"]},
                {"query_id": "q2", "window": 0, "doc_ids": ["e", "f", "g"], "selected": []},
            ]
        ),
        "graded": _stage_table(
            [
                {"query_id": "q2", "window": i, "doc_ids": [d], "grade": g}
                for i, (d, g) in enumerate([("e", 3), ("f", 1), ("g", None)])
            ]
        ),
    }
    # only what the model ranked counts: b (left out) ranks nowhere, q2 (unparsed) has no order
    assert merged_ranking(done["utilrank"]) == {"q1": ["c", "d", "a"], "q2": []}
    labels = build_labels(inputs, done, pools, AnnotateConfig(model="m", utilrank_top_percent=50))
    positives: dict = {}
    for r in labels.to_pylist():
        positives.setdefault((r["query_id"], r["source"]), set())
        if r["positive"]:
            positives[(r["query_id"], r["source"])].add(r["doc_id"])
    assert positives[("q1", "relsel")] == {"a", "b"} and positives[("q2", "relsel")] == {"e"}
    assert positives[("q1", "utilsel")] == {"b"} and positives[("q2", "utilsel")] == set()
    assert positives[("q1", "utilrank")] == {"c", "d"}  # top 50% of the 4 shown, among the ranked
    assert positives[("q2", "utilrank")] == set()  # an unparsed ranking yields no positive
    assert positives[("q2", "graded")] == {"e"} and ("q1", "graded") not in positives
    assert labels.num_rows == 7 + 7 + 7 + 7 + 3  # human, relsel, utilsel, utilrank over both pools; graded q2
    ranks = {r["doc_id"]: r["rank"] for r in labels.to_pylist() if r["source"] == "utilrank"}
    assert ranks["c"] == 1 and ranks["a"] == 3 and ranks["b"] is None and ranks["e"] is None
    # Inclusion: the human positive is always a positive; Exclusion: it is not in the LLM labels at all
    inclusion = build_labels(inputs, done, pools, AnnotateConfig(model="m", human_positive="inclusion"))
    utilsel_q2 = {
        r["doc_id"]
        for r in inclusion.to_pylist()
        if r["source"] == "utilsel" and r["positive"] and r["query_id"] == "q2"
    }
    assert utilsel_q2 == {"f"}
    exclusion = build_labels(inputs, done, pools, AnnotateConfig(model="m", human_positive="exclusion"))
    assert not [r for r in exclusion.to_pylist() if r["source"] == "relsel" and r["doc_id"] in ("a", "f")]

    rows = {r["source"]: r for r in agreement(labels, {"relsel": {"parse_failure_rate": 0.25}})}
    # relsel: chosen {a,b} + {e}; correct a; human a + f -> precision 1/3, recall 1/2
    assert rows["relsel"]["precision"] == pytest.approx(1 / 3, abs=1e-4)
    assert rows["relsel"]["recall"] == 0.5 and rows["relsel"]["positives_per_query"] == 1.5
    assert rows["relsel"]["parse_failure_rate"] == 0.25
    assert rows["graded"]["queries"] == 1 and rows["graded"]["recall"] == 0.0
    kappa = graded_kappa(labels)  # judged pool docs with both grades: (q2,f) 2 vs 1
    assert kappa["pairs"] == 1 and kappa["exact_agreement"] == 0.0
    # By shown position: human positives a (shown 1st, relsel chose it) and f (2nd, not chosen)
    shown = shown_positions(done["relsel"])  # [n] in the RelSel windows
    assert shown[("q1", "a")] == 1 and shown[("q2", "f")] == 2
    by_position = {(r["source"], r["shown_at"]): r for r in agreement_by_position(labels, shown)}
    assert by_position[("relsel", "1")]["recall"] == 1.0 and by_position[("relsel", "2-5")]["recall"] == 0.0
    assert by_position[("relsel", "1")]["human_positives"] == 1 and ("relsel", "6-10") not in by_position
    # Exclusion: the LLM stages label no human positive, so there is nothing to show by position
    assert not [r for r in agreement_by_position(exclusion, shown) if r["source"] == "relsel"]


def test_qametric_labels_score_each_passages_answer_against_the_gold_answers():
    """The QA-metric baseline: the passages whose answer scores the query's best F1 (>= min_score) are the
    positives (rule best), or every passage at min_score or more (rule threshold); rank = order by score."""
    from utilrag.annotate.stages import qametric_labels

    inputs, pools = _inputs()  # q1: a b c d (human a), q2: e f g (human f)
    answers = {"a": "Paris", "b": "in Paris, France", "c": "Lyon", "d": ""}
    done = {
        "qametric": _stage_table(
            [
                *[{"query_id": "q1", "window": i, "doc_ids": [d], "answer": answers[d]} for i, d in enumerate("abcd")],
                *[{"query_id": "q2", "window": i, "doc_ids": [d], "answer": "no idea"} for i, d in enumerate("efg")],
            ]
        )
    }
    gold = {"q1": ["Paris", "the city of Paris"], "q2": ["42"]}
    acfg = AnnotateConfig(model="m")
    assert qametric_labels(answers, gold["q1"], acfg) == {
        "a": (1.0, 1),
        "b": (pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1)), 2),  # "in paris france" vs "paris": P 1/3, R 1
        "c": (0.0, 3),
        "d": (0.0, 4),
    }

    def positives(cfg: AnnotateConfig) -> dict:
        rows = build_labels(inputs, done, pools, cfg, gold).to_pylist()
        return {
            q: {r["doc_id"] for r in rows if r["source"] == "qametric" and r["query_id"] == q and r["positive"]}
            for q in ("q1", "q2")
        }

    assert positives(acfg) == {"q1": {"a"}, "q2": set()}  # best: a; q2's answers score 0: no positive
    threshold = acfg.model_copy(
        update={"qametric": acfg.qametric.model_copy(update={"rule": "threshold", "min_score": 0.4})}
    )
    assert positives(threshold) == {"q1": {"a", "b"}, "q2": set()}
    em = acfg.model_copy(update={"qametric": acfg.qametric.model_copy(update={"metric": "em"})})
    assert positives(em) == {"q1": {"a"}, "q2": set()}
    inclusion = acfg.model_copy(update={"human_positive": "inclusion"})
    assert positives(inclusion) == {"q1": {"a"}, "q2": {"f"}}
    assert qametric_labels({"a": "x"}, [], acfg) == {"a": (0.0, 1)}  # no gold answer: nothing answers it
    # ROUGE-L (MS MARCO's) on normalised words: case and punctuation do not break a match; an empty gold
    # answer (MS MARCO keeps some) is no answer
    rouge = acfg.model_copy(update={"qametric": acfg.qametric.model_copy(update={"metric": "rouge_l"})})
    assert qametric_labels({"a": "Paris."}, ["paris"], rouge)["a"][0] == 1.0
    assert qametric_labels({"a": ""}, [""], rouge)["a"][0] == 0.0
    # a query missing from the gold answers gets no positive; Exclusion leaves the human positive out
    assert positives(acfg.model_copy()) == {"q1": {"a"}, "q2": set()}
    missing = build_labels(inputs, done, pools, acfg, {"q2": ["42"]}).to_pylist()
    assert not [r for r in missing if r["source"] == "qametric" and r["positive"]]
    exclusion = build_labels(inputs, done, pools, acfg.model_copy(update={"human_positive": "exclusion"}), gold)
    assert {r["doc_id"] for r in exclusion.to_pylist() if r["source"] == "qametric"} == {"b", "c", "d", "e", "g"}
    rows = {r["source"]: r for r in agreement(build_labels(inputs, done, pools, acfg, gold), {})}
    assert rows["qametric"]["precision"] == 1.0 and rows["qametric"]["recall"] == 0.5  # a of {a, f}


def test_cohen_kappa_by_hand():
    # observed agreement 0.75, chance agreement 0.5 -> 0.5
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0], [0, 1]) == pytest.approx(0.5)
    assert cohen_kappa([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    # linear weights forgive near misses more than exact kappa does
    a, b = [0, 1, 2, 3, 3, 2], [0, 2, 2, 3, 2, 2]
    assert cohen_kappa(a, b, [0, 1, 2, 3], "linear") > cohen_kappa(a, b, [0, 1, 2, 3])


def test_bad_input_is_counted_not_dropped(tmp_path):
    corpus = pa.table(
        {
            "doc_id": ["a", "b", "c", "e"],
            "title": ["", "", "", ""],
            "text": ["alpha text", "   ", "gamma " * 400, "eps"],
        }
    )
    pq.write_table(corpus, tmp_path / "corpus.parquet")
    pools = pa.table(
        {
            "query_id": ["q1"] * 4 + ["q2"] * 2 + ["q3"] * 2,
            "doc_id": ["a", "b", "c", "z", "a", "c", "a", "c"],
            "position": [0, 1, 2, 3, 0, 1, 0, 1],
            "source": ["human", "r", "r", "r", "human", "r", "human", "r"],
            "human_grade": [1, None, None, None, 1, None, 1, None],
        },
        schema=pa.schema(
            [
                ("query_id", pa.string()),
                ("doc_id", pa.string()),
                ("position", pa.int32()),
                ("source", pa.string()),
                ("human_grade", pa.int32()),
            ]
        ),
    )
    queries = pa.table({"query_id": ["q1", "q2", "q3"], "text": ["first", "second", " "]})
    inputs = load_inputs(
        pools, queries, tmp_path, AnnotateTarget(dataset="d", split="s"), AnnotateConfig(model="m", passage_words=300)
    )
    reasons = Counter(r[2] for r in inputs.rejects)
    assert reasons == {"empty passage": 1, "passage not in the corpus": 1, "missing query text": 1}
    assert inputs.pools == {"q1": ["a", "c"], "q2": ["a", "c"]} and inputs.cut == {"c"}
    assert len(inputs.passages["c"].split()) == 300
    excluded = load_inputs(
        pools,
        queries,
        tmp_path,
        AnnotateTarget(dataset="d", split="s"),
        AnnotateConfig(model="m", human_positive="exclusion"),
    )
    assert "q1" not in excluded.pools  # only "c" left to show: a pool of < 2
    assert any("pool has 1 passage" in r[2] for r in excluded.rejects)


def test_model_errors_are_one_line(tmp_path):
    with pytest.raises(AnnotateError, match="no such folder"):
        resolve_llm("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnotateError, match="has no config.json"):
        resolve_llm(str(tmp_path / "empty"))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"hidden_size": 96, "num_attention_heads": 2}')
    with pytest.raises(AnnotateError, match="head size 48 is not supported by vLLM on CPU"):
        check_model(str(odd), use_gpu=False)
    check_model(str(odd), use_gpu=True)  # a GPU backend decides for itself


def test_cli_reports_a_missing_model_as_one_line(tmp_path, capsys):
    from utilrag.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "out"),
                "ingest": {"datasets": [{"name": "x"}]},
                "annotate": {"model": str(tmp_path / "nope"), "targets": [{"dataset": "x", "split": "y"}]},
            }
        )
    )
    assert main(["annotate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0]


# --------------------------------------------------------------------------- the streaming chain, no engine
def _pools_queries_corpus():
    corpus = pa.table(
        {
            "doc_id": list("abcdefgh") + ["e2"],
            "title": [""] * 9,
            "text": ["alpha one", "beta two", "gamma " * 40, "delta", "  ", "phi", "gee", "aitch", "e two"],
        }
    )
    rows = [  # (query, doc, position, source, grade)
        *[("q1", d, i, "human" if d == "a" else "bm25", 3 if d == "a" else None) for i, d in enumerate("abcdz")],
        *[
            ("q2", d, i, "human" if d == "f" else "bm25", 2 if d == "f" else (0 if d == "g" else None))
            for i, d in enumerate("fgh")
        ],
        *[("q3", d, i, "bm25", None) for i, d in enumerate("abe")],  # e is empty: 2 left
        *[("q4", d, i, "bm25", None) for i, d in enumerate("ab")],  # no query text
        *[("q5", d, i, "bm25", None) for i, d in enumerate(["e", "e2"])],  # 1 passage left
    ]
    schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("position", pa.int32()),
            ("source", pa.string()),
            ("human_grade", pa.int32()),
        ]
    )
    pools = pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema)
    queries = pa.table({"query_id": ["q1", "q2", "q3", "q4", "q5"], "text": ["one", "two", "three", " ", "five"]})
    return pools, queries, corpus


def _stand_in(stage: str, messages: list[dict]) -> str:
    """A deterministic fake answer per prompt (not an engine: the chain's bookkeeping is under test)."""
    import zlib

    h = zlib.crc32(json.dumps(messages).encode())
    if stage == "answer":
        return "" if h % 5 == 0 else f"answer {h % 97}"
    if stage == "graded":
        return f"##final score: {h % 4}"
    if stage == "qametric":
        return f"answer {h % 3}"
    n = sum(1 for m in messages if m["role"] == "user" and m["content"].startswith("["))
    picks = [i for i in range(1, n + 1) if (h >> i) % 3 != 0]
    if stage == "utilrank":
        return " > ".join(f"[{i}]" for i in picks or [1])
    return "My selection:[" + ",".join(f"[{i}]" for i in picks) + "]."


def _outputs(stages_and_messages) -> dict:
    raw = [_stand_in(stage, m) for stage, m in stages_and_messages]
    n = len(raw)
    return {
        "raw_output": raw,
        "prompt_tokens": [len(json.dumps(m)) for _, m in stages_and_messages],
        "output_tokens": [len(r) for r in raw],
        "cached_tokens": [0] * n,
        "finish_reason": ["stop"] * n,
    }


def _old_path(inputs: TargetInputs, acfg: AnnotateConfig, label: str) -> dict[str, pa.Table]:
    """Today's per-stage path (build_requests -> one answer per request -> parse_output), no engine."""
    from utilrag.annotate.chain import row_meta
    from utilrag.annotate.stages import STAGE_ORDER, parse_output

    done: dict[str, pa.Table] = {}
    for stage in (s for s in STAGE_ORDER if s in acfg.stages):
        requests, _ = build_requests(stage, inputs, acfg, done, graded_seed=label)
        messages = [json.loads(m) for m in requests.column("messages").to_pylist()]
        out = _outputs([(stage, m) for m in messages])
        rows = []
        for i, r in enumerate(requests.to_pylist()):
            rows.append(
                {
                    **{k: r[k] for k in ("query_id", "window", "doc_ids", "passages_cut")},
                    **{k: out[k][i] for k in out},
                    **parse_output(stage, out["raw_output"][i], r["doc_ids"], "stop"),
                    **row_meta(stage, acfg),
                }
            )
        done[stage] = pa.Table.from_pylist(rows, schema=STAGE_SCHEMA).sort_by(
            [("query_id", "ascending"), ("window", "ascending")]
        )
    return done


def test_inputs_rows_match_todays_load_inputs(tmp_path):
    from utilrag.annotate.prepare import prepare_local

    pools, queries, corpus = _pools_queries_corpus()
    pq.write_table(corpus, tmp_path / "corpus.parquet")
    for human_positive in ("random", "exclusion"):
        acfg = AnnotateConfig(model="m", passage_words=5, human_positive=human_positive)
        old = load_inputs(pools, queries, tmp_path, AnnotateTarget(dataset="d", split="s"), acfg)
        rows = {r["query_id"]: r for r in prepare_local(pools, queries, corpus, acfg).to_pylist()}
        assert {q for q, r in rows.items() if r["annotate"]} == set(old.pools)
        for q, shown in old.pools.items():
            assert rows[q]["doc_ids"] == shown
            assert rows[q]["passages"] == [old.passages[d] for d in shown]
            assert rows[q]["cut"] == [d in old.cut for d in shown]
            assert set(rows[q]["human"]) == old.human[q]
            assert dict(zip(rows[q]["judged"], rows[q]["judged_grades"])) == old.human_grades[q]
        new_rejects = sorted((q, x["doc_id"], x["reason"]) for q, r in rows.items() for x in r["rejects"])
        assert new_rejects == sorted(old.rejects) and len(new_rejects) >= 4


@pytest.mark.parametrize(
    "stages", [["relsel"], ["relsel", "answer", "utilsel", "utilrank", "graded", "qametric"]], ids=["one", "all"]
)
def test_the_chain_gives_todays_stage_rows_and_labels(stages):
    """One block through run_block (the replica's waves) == today's stage-by-stage requests, given
    the same answer per prompt; and the labels cut per part == today's build_labels."""
    from utilrag.annotate.chain import run_block
    from utilrag.annotate.job import explode, part_labels
    from utilrag.annotate.prepare import prepare_local
    from utilrag.annotate.stages import STAGE_ORDER

    pools, queries, corpus = _pools_queries_corpus()
    acfg = AnnotateConfig(model="m", window=2, passage_words=5, stages=stages, graded_queries=2)
    label = "d/s"
    inputs_table = prepare_local(pools, queries, corpus, acfg)
    block = inputs_table.filter(inputs_table["annotate"])
    graded = _graded_ids(block, acfg, label)
    part = run_block(block, lambda reqs: _outputs([(r.stage, r.messages) for r in reqs]), acfg, graded, "run1")
    tables = {s: explode(part, s) for s in STAGE_ORDER if s in stages}

    pq_path = None  # today's path reads the corpus from a folder
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        pq_path = Path(folder) / "corpus.parquet"
        pq.write_table(corpus, pq_path)
        inputs = load_inputs(pools, queries, folder, AnnotateTarget(dataset="d", split="s"), acfg)
    old = _old_path(inputs, acfg, label)
    for stage in stages:
        assert tables[stage].num_rows and tables[stage].to_pylist() == old[stage].to_pylist(), stage
    all_pools = {
        q: [d for d in pools.filter(pc.equal(pools["query_id"], q))["doc_id"].to_pylist()] for q in inputs.pools
    }
    gold = {q: ["answer 1"] for q in inputs.pools}  # the QA-metric stage's answers are scored against it
    old_labels = build_labels(inputs, old, all_pools, acfg, gold)
    new_labels = part_labels(part, tables, acfg, gold)
    if "qametric" in stages:
        scored = [r for r in new_labels.to_pylist() if r["source"] == "qametric"]
        assert scored and any(r["positive"] for r in scored) and not all(r["positive"] for r in scored)
    assert new_labels.sort_by(
        [("query_id", "ascending"), ("source", "ascending"), ("doc_id", "ascending")]
    ).to_pylist() == (
        old_labels.sort_by([("query_id", "ascending"), ("source", "ascending"), ("doc_id", "ascending")]).to_pylist()
    )


def test_the_async_chain_gives_the_waves_rows():
    """run_block_async (each query on its own, requests finishing in any order) writes the same part as
    run_block (one wave of the whole block at a time), for every stage."""
    import asyncio
    import random

    from utilrag.annotate.chain import run_block, run_block_async
    from utilrag.annotate.prepare import prepare_local

    stages = ["relsel", "answer", "utilsel", "utilrank", "graded"]
    pools, queries, corpus = _pools_queries_corpus()
    acfg = AnnotateConfig(model="m", window=2, passage_words=5, stages=stages, graded_queries=2)
    inputs_table = prepare_local(pools, queries, corpus, acfg)
    block = inputs_table.filter(inputs_table["annotate"])
    graded = _graded_ids(block, acfg, "d/s")
    waves = run_block(block, lambda reqs: _outputs([(r.stage, r.messages) for r in reqs]), acfg, graded, "run1")
    delays = random.Random(0)

    async def generate_one(request):
        await asyncio.sleep(delays.random() / 1000)  # requests end out of order, as an engine's do
        return {k: v[0] for k, v in _outputs([(request.stage, request.messages)]).items()}

    part = asyncio.run(run_block_async(block, generate_one, acfg, graded, "run1"))
    assert part.equals(waves)
    assert sum(len(v) for s in stages for v in part.column(s).to_pylist()) > 2 * block.num_rows


def _graded_ids(block: pa.Table, acfg: AnnotateConfig, label: str) -> list[str] | None:
    import random

    qids = sorted(block["query_id"].to_pylist())
    if acfg.graded_queries is None or acfg.graded_queries >= len(qids):
        return None
    return sorted(random.Random(f"graded:{label}").sample(qids, acfg.graded_queries))


def test_the_bucket_shuffle_gives_the_same_rows_as_one_join(tmp_path):
    """prepare.py's Ray job, its steps called here one batch at a time (no Ray): corpus, pools and
    queries into buckets, bucket joins, per-query rows == prepare_local's."""
    import numpy as np

    from utilrag.annotate import prepare

    pools, queries, corpus = _pools_queries_corpus()
    acfg = AnnotateConfig(model="m", passage_words=5)
    prep, inputs = str(tmp_path / "prep"), str(tmp_path / "inputs")
    docs, qs = 3, 2
    for half in (corpus.slice(0, 4), corpus.slice(4)):  # two batches of each table
        prepare._bucket_corpus(half, passage_words=5, key="doc_id", buckets=docs, folder=f"{prep}/corpus", name="b")
    for half in (pools.slice(0, 9), pools.slice(9)):
        prepare._bucket_pools(half, wanted=None, key="doc_id", buckets=docs, folder=f"{prep}/pools", name="b")
    prepare._bucket_batch(queries, key="query_id", buckets=qs, folder=f"{prep}/queries", name="c")
    prepare._join_bucket({"id": np.arange(docs)}, prep=prep, queries_buckets=qs)
    prepare._query_bucket({"id": np.arange(qs)}, prep=prep, inputs=inputs, acfg=acfg)
    got = pa.concat_tables([pq.read_table(f) for f in sorted(Path(inputs).glob("part-*.parquet"))])
    assert got.num_rows == 5
    want = prepare.prepare_local(pools, queries, corpus, acfg)
    by_id = {r["query_id"]: {k: v for k, v in r.items() if k != "part"} for r in want.to_pylist()}
    assert {r["query_id"]: {k: v for k, v in r.items() if k != "part"} for r in got.to_pylist()} == by_id
    from utilrag.annotate.job import expected_by_part, write_rejects

    assert sum(expected_by_part(inputs).values()) == 3
    annotated, rejects, cut = write_rejects(inputs, str(tmp_path / "rejects.parquet"))
    assert (annotated, rejects, cut) == (3, pq.read_metadata(tmp_path / "rejects.parquet").num_rows, 1)


def test_finalize_cuts_stage_tables_labels_and_report_out_of_parts(tmp_path):
    from utilrag.annotate.chain import part_name, run_block
    from utilrag.annotate.job import check_parts, finalize
    from utilrag.annotate.prepare import prepare_local
    from utilrag.annotate.report import agreement

    pools, queries, corpus = _pools_queries_corpus()
    stages = ["relsel", "answer", "utilsel", "utilrank"]
    acfg = AnnotateConfig(model="m", window=2, passage_words=5, stages=stages)
    table = prepare_local(pools, queries, corpus, acfg)
    block = table.filter(table["annotate"])
    parts = tmp_path / "chain.parts"
    parts.mkdir()
    generate = lambda reqs: _outputs([(r.stage, r.messages) for r in reqs])  # noqa: E731
    whole = run_block(block, generate, acfg, None, "old")
    for rows, run in ((block.slice(0, 2), "old"), (block.slice(2), "new")):  # two blocks, two runs
        part = run_block(rows, generate, acfg, None, run)
        pq.write_table(part, parts / part_name(part["query_id"].to_pylist()))
    assert check_parts(str(parts), 3, "t") == 3
    with pytest.raises(AnnotateError, match="expected 4"):
        check_parts(str(parts), 4, "t")
    tallies, report, label_rows, errors = finalize(
        str(tmp_path), str(tmp_path / "labels.parquet"), str(tmp_path / "errors.parquet"), acfg, "new"
    )
    assert errors == {} and pq.read_table(tmp_path / "errors.parquet").num_rows == 0
    relsel = pq.read_table(tmp_path / "relsel.parquet")
    # one row group for the two parts (not one per part: a table of 30,000 parts would be slow to scan)
    assert pq.ParquetFile(tmp_path / "relsel.parquet").num_row_groups == 1
    assert pq.ParquetFile(tmp_path / "labels.parquet").num_row_groups == 1
    assert relsel.num_rows == tallies["relsel"].counts["rows"] == sum(len(v) for v in whole["relsel"].to_pylist())
    assert set(relsel.column("query_id").to_pylist()) == {"q1", "q2", "q3"}
    new_rows = sum(1 for q in relsel.column("query_id").to_pylist() if q == block["query_id"][2].as_py())
    summary = tallies["relsel"].summary(1.0, None)
    assert summary["new_rows"] == new_rows and summary["resumed_rows"] == relsel.num_rows - new_rows
    labels = pq.read_table(tmp_path / "labels.parquet")
    assert labels.num_rows == label_rows
    assert report.agreement({}) == agreement(labels, {})
    assert not list(tmp_path.glob(".tmp-*"))


def test_finalize_reads_its_parts_from_object_storage(s3_env, tmp_path):
    """The same parts on the S3-compatible server: read several at a time (read_columns, finalize),
    the stage tables and labels written there equal the ones written from a local folder."""
    from conftest import S3_BUCKET
    from utilrag import store
    from utilrag.annotate.chain import part_name, run_block
    from utilrag.annotate.job import check_parts, finalize, write_atomic
    from utilrag.annotate.prepare import prepare_local

    pools, queries, corpus = _pools_queries_corpus()
    acfg = AnnotateConfig(model="m", window=2, passage_words=5, stages=["relsel", "answer", "utilsel", "utilrank"])
    table = prepare_local(pools, queries, corpus, acfg)
    block = table.filter(table["annotate"])
    generate = lambda reqs: _outputs([(r.stage, r.messages) for r in reqs])  # noqa: E731
    remote, local = f"s3://{S3_BUCKET}/finalize", str(tmp_path / "local")
    for i in range(block.num_rows):  # one part per query: more parts than reads in flight
        part = run_block(block.slice(i, 1), generate, acfg, None, "r")
        for out in (remote, local):
            write_atomic(part, store.join(out, "chain.parts", part_name(part["query_id"].to_pylist())))
    os.makedirs(local, exist_ok=True)

    def read(location: str) -> pa.Table:
        fs, path = store.filesystem(location)
        return pq.read_table(path, filesystem=fs)

    results = {}
    for out in (remote, local):
        assert check_parts(store.join(out, "chain.parts"), block.num_rows, "t") == block.num_rows
        counts = finalize(out, store.join(out, "labels.parquet"), store.join(out, "errors.parquet"), acfg, "r")
        results[out] = (counts[2], read(store.join(out, "relsel.parquet")), read(store.join(out, "labels.parquet")))
    assert results[remote][0] == results[local][0] > 0
    assert results[remote][1].equals(results[local][1]) and results[remote][2].equals(results[local][2])


def test_a_model_on_object_storage_is_copied_once_per_node(s3_env, tmp_path):
    """Two replicas of one node start at once with the model on the S3-compatible server: one copies it
    into the node's cache, the other waits and uses that copy; a changed model is copied afresh."""
    from conftest import S3_BUCKET
    from utilrag import store
    from utilrag.annotate.engine import check_model, resolve_llm

    uri = f"s3://{S3_BUCKET}/models/tiny"
    config = {"num_attention_heads": 2, "hidden_size": 128, "architectures": ["LlamaForCausalLM"]}
    store.write_text(f"{uri}/config.json", json.dumps(config))
    store.write_text(f"{uri}/model.safetensors", "w" * 3_000_000)  # big enough for the second to wait
    assert resolve_llm(uri + "/") == uri
    check_model(uri, use_gpu=False)  # head size 64: fine on CPU, read from the bucket
    with pytest.raises(AnnotateError, match="no config.json there"):
        resolve_llm(f"s3://{S3_BUCKET}/models/none")

    code = "from utilrag.annotate.engine import stage_model; import sys; print('PATH', stage_model(sys.argv[1]))"
    env = {**os.environ, "UTILRAG_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}

    def replicas(n: int) -> list[str]:
        procs = [
            subprocess.Popen([sys.executable, "-c", code, uri], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        return [p.communicate(timeout=120)[0] for p in procs]

    outputs = replicas(2)
    paths = {ln.split()[1] for out in outputs for ln in out.splitlines() if ln.startswith("PATH")}
    assert len(paths) == 1 and sum("copying" in out for out in outputs) == 1, outputs
    [path] = paths
    assert json.loads(Path(path, "config.json").read_text()) == config and Path(path, ".complete").is_file()
    assert "copying" not in replicas(1)[0]  # a later replica on the node: no copy
    store.write_text(f"{uri}/model.safetensors", "v" * 3_000_000)  # a new model at the same place
    again = replicas(1)[0]
    assert "copying" in again and again.split("PATH ")[1].strip() != path


def test_a_stage_without_its_input_stage_is_one_clear_error():
    from utilrag.annotate import check_stage_needs

    check_stage_needs(AnnotateConfig(model="m", stages=["relsel", "answer", "utilrank"]))
    with pytest.raises(AnnotateError, match="asks for 'utilsel', which needs the 'answer' stage's output"):
        check_stage_needs(AnnotateConfig(model="m", stages=["relsel", "utilsel"]))


class _StandInEngine:
    """An engine stand-in for the replica class (its bookkeeping is under test, not vLLM)."""

    error = None
    starts = 1
    busy_s = 0.0

    def __init__(self, model: str, engine: dict):
        self.ready_at = time.time()

    def sampling_params(self, sampling: dict) -> dict:
        return sampling

    def check(self) -> None:
        return None

    def generate(self, messages: list, sampling: list) -> dict:
        return _outputs([(_stage_of(m), m) for m in messages])


_STAGE_PROMPTS = {
    "relevance judger": "relsel",
    "question and answer assistant": "answer",
    "utility judger": "utilsel",
    "RankGPT": "utilrank",
    "search quality rater": "graded",
}


def _stage_of(chat: list[dict]) -> str:
    """Which stage asks, from its system prompt (the stand-in answers each in that stage's format)."""
    return next(stage for text, stage in _STAGE_PROMPTS.items() if text in chat[0]["content"])


def test_a_replica_writes_each_block_once_under_its_own_name(tmp_path):
    """ChainAnnotator (the Ray Data UDF) called directly: one part per block, a retried block rewrites
    its part, an empty block writes nothing; it returns one stats row per block."""
    from utilrag.annotate.chain import ChainAnnotator
    from utilrag.annotate.prepare import prepare_local

    pools, queries, corpus = _pools_queries_corpus()
    acfg = AnnotateConfig(model="m", window=2, passage_words=5, stages=["relsel", "answer"])
    table = prepare_local(pools, queries, corpus, acfg)
    block = table.filter(table["annotate"])
    replica = ChainAnnotator("m", {}, acfg, str(tmp_path / "parts"), "r1", engine_factory=_StandInEngine)
    stats = replica(block)
    assert stats["queries"].tolist() == [3] and stats["engine_starts"].tolist() == [1]
    again = replica(block)  # the same block again (a retried task): its part exists, so it is skipped
    assert again["queries"].tolist() == [3] and again["rows"].tolist() == [0]  # counted, nothing generated
    replica(block.slice(0, 0))
    files = list((tmp_path / "parts").glob("*.parquet"))
    assert len(files) == 1 and pq.read_metadata(files[0]).num_rows == 3
    assert not list((tmp_path / "parts").glob(".tmp-*"))


class _AsyncCapable:
    """generate_one for a stand-in (AsyncChainAnnotator's call), on top of its generate."""

    async def generate_one(self, chat: list, sampling: dict) -> dict:
        out = self.generate([chat], [sampling])  # type: ignore[attr-defined]
        return {k: v[0] for k, v in out.items()}


class _PoisonStandIn(_AsyncCapable, _StandInEngine):
    """Every request that shows passage "aitch" (query q2's pool) raises: a query that always fails."""

    seen: Counter = Counter()

    def generate(self, messages: list, sampling: list) -> dict:
        if any("aitch" in json.dumps(m) for m in messages):
            self.seen["poisoned"] += 1
            raise ValueError("a poisoned request")
        return super().generate(messages, sampling)


class _Exited(BaseException):
    """os._exit in the replica, turned into an exception (the test is the replica's process)."""


class _DyingStandIn(_AsyncCapable, _StandInEngine):
    """Its "engine process" dies with any request that shows passage "aitch" (query q2): vLLM's
    EngineDeadError from then on, as a real engine whose core process died."""

    def __init__(self, model: str, engine: dict):
        super().__init__(model, engine)
        self.dead = False

    def generate(self, messages: list, sampling: list) -> dict:
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.dead or any("aitch" in json.dumps(m) for m in messages):
            self.dead = True
            raise EngineDeadError()
        return super().generate(messages, sampling)


def _replica_block(tmp_path, engine, asynchronous: bool, **scale):
    """A replica maker (ChainAnnotator or AsyncChainAnnotator, called like Ray Data calls it) and a block."""
    from utilrag.annotate.chain import AsyncChainAnnotator, ChainAnnotator
    from utilrag.annotate.prepare import prepare_local

    pools, queries, corpus = _pools_queries_corpus()
    acfg = AnnotateConfig(model="m", window=2, passage_words=5, stages=["relsel", "answer"], scale=scale)
    table = prepare_local(pools, queries, corpus, acfg)
    block = table.filter(table["annotate"])

    def new_replica():
        cls = AsyncChainAnnotator if asynchronous else ChainAnnotator
        replica = cls("m", {}, acfg, str(tmp_path / "parts"), "r1", engine_factory=engine)
        return (lambda b: asyncio.run(replica(b))) if asynchronous else replica

    return new_replica, block


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_query_whose_requests_keep_failing_becomes_an_error_row(tmp_path, asynchronous):
    """The block raises: it is run a query at a time, the failing query tried scale.query_tries times,
    then written as an error row (its stage, the reason, no stage rows); the others as usual."""
    new_replica, block = _replica_block(tmp_path, _PoisonStandIn, asynchronous, query_tries=2)
    _PoisonStandIn.seen.clear()
    stats = new_replica()(block)
    assert stats["queries"].tolist() == [3]
    [part] = [pq.read_table(p) for p in (tmp_path / "parts").glob("part-*.parquet")]
    rows = {r["query_id"]: r for r in part.to_pylist()}
    assert sorted(rows) == ["q1", "q2", "q3"]
    assert rows["q2"]["error_stage"] == "relsel" and rows["q2"]["relsel"] == [] and rows["q2"]["answer"] == []
    assert rows["q2"]["error"] == "2 tries: ValueError: a poisoned request"
    assert all(rows[q]["error"] is None and rows[q]["relsel"] for q in ("q1", "q3"))
    # the whole block once, then q2 alone twice (async: up to both of q2's windows each time, the
    # other one cancelled when the first raises)
    assert _PoisonStandIn.seen["poisoned"] == 3 if not asynchronous else 3 <= _PoisonStandIn.seen["poisoned"] <= 6


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_engine_death_exits_the_replica_and_a_query_that_kills_it_becomes_an_error_row(
    tmp_path, monkeypatch, asynchronous
):
    """Each engine death: the replica counts it beside the parts and exits (Ray restarts it and retries
    the block). After scale.query_tries deaths the block runs a query at a time; the query that takes
    its engine down scale.query_tries times more is an error row. A replica past
    scale.engine_deaths_per_replica (first deaths of blocks) fails the job instead."""
    from utilrag.annotate import chain

    def exit_(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(chain.os, "_exit", exit_)
    new_replica, block = _replica_block(tmp_path, _DyingStandIn, asynchronous, query_tries=2)
    tries = tmp_path / "parts" / ".tries"
    block_name = chain.part_name(block.column("query_id").to_pylist()).removesuffix(".parquet")
    for death in (1, 2):  # the whole block dies twice (Ray would restart the replica each time)
        with pytest.raises(_Exited):
            new_replica()(block)
        assert json.loads((tries / f"{block_name}.json").read_text())["deaths"] == death
    # the next replicas run the block a query at a time: q2 takes the engine down twice more (its own
    # count); the fifth writes the block's part with q2 as an error row, without asking the engine.
    for death in (1, 2):
        with pytest.raises(_Exited):
            new_replica()(block)
        assert json.loads((tries / f"{chain.query_key('q2')}.json").read_text())["deaths"] == death
    stats = new_replica()(block)
    assert stats["queries"].tolist() == [3]
    [part] = [pq.read_table(p) for p in (tmp_path / "parts").glob("part-*.parquet")]
    rows = {r["query_id"]: r for r in part.to_pylist()}
    assert rows["q2"]["error_stage"] == "relsel"
    assert rows["q2"]["error"].startswith("2 tries: its engine died with it in flight: EngineDeadError")
    assert all(rows[q]["error"] is None and rows[q]["relsel"] for q in ("q1", "q3"))
    [replica_file] = tries.glob("replica-*.json")
    # the replica's budget (scale.engine_deaths_per_replica, 3) was charged once: the block's first
    # death; its later deaths and q2's were the input's doing
    assert json.loads(replica_file.read_text())["deaths"] == 1
    # the same replica (one actor id across restarts) past its budget: the job fails, with the reason
    new_replica, block = _replica_block(tmp_path / "b", _DyingStandIn, asynchronous, engine_deaths_per_replica=0)
    with pytest.raises(AnnotateError, match=r"a replica's engine died 1 times .*engine_deaths_per_replica=0"):
        new_replica()(block)


def test_progress_counts_the_queries_of_new_parts_with_rate_eta_and_gpu_hours(tmp_path, monkeypatch):
    """The driver's progress line while replicas write parts: queries done/total (the resumed ones
    included), the rate of this run, the ETA and the GPU-hours so far; each new part read once."""
    from utilrag.annotate import job
    from utilrag.annotate.chain import CHAIN_SCHEMA

    parts = tmp_path / "chain.parts"
    parts.mkdir()

    def part(name: str, n: int) -> None:
        rows = [{"query_id": f"{name}{i}", "part": 0} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows, schema=CHAIN_SCHEMA), parts / f"part-{name}.parquet")

    part("old", 40)  # written by an earlier run: counted in `done` already
    clock = [1000.0]
    monkeypatch.setattr(job.time, "time", lambda: clock[0])
    watch = job.PartsWatch(str(parts), "dl19/train", 40, 1000, 8, every_s=3600)
    try:
        part("a", 16)
        part("b", 16)
        (parts / ".tmp-part-c.parquet").write_bytes(b"half")  # being written: not counted
        clock[0] += 64
        watch.count()
        watch.count()  # nothing new: nothing counted twice
        assert watch.done == 72
        assert watch.line() == (
            "dl19/train: queries 72/1,000 (7.2%), 0.50 queries/s, ETA 30m, 1m elapsed, 0.14 GPU-hours so far (8 GPUs)"
        )
    finally:
        watch.stop()
    assert (
        job.duration(59) == "59s"
        and job.duration(3 * 3600 + 300) == "3h05m"
        and job.duration(2 * 86400 + 7200) == "2d02h"
    )


def test_the_reaper_kills_the_engine_processes_only_once_their_replica_is_gone(tmp_path):
    """A stand-in replica (a process) with a long-lived child (its "EngineCore") and children that come
    and go: while it lives, nothing is killed; once it is SIGKILLed, the reaper kills the orphan."""
    import threading

    import psutil

    from utilrag.annotate.reaper import reap

    pid_file = tmp_path / "core.pid"
    code = (
        "import subprocess, sys, time\n"
        "core = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(core.pid))\n"
        "for _ in range(300):  # children that end while the reaper lists them\n"
        "    subprocess.Popen(['sleep', '0.003'])\n"
        "    time.sleep(0.004)\n"
        "time.sleep(120)\n"
    )
    replica = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_until("the stand-in engine", lambda _: pid_file.exists() and pid_file.read_text() or None, deadline_s=60)
        core = psutil.Process(int(pid_file.read_text()))
        killed: list[int] = []
        watcher = threading.Thread(target=lambda: killed.append(reap(replica.pid, set(), poll_s=0.001)), daemon=True)
        watcher.start()
        time.sleep(2)  # the short-lived children came and went meanwhile
        assert core.is_running() and watcher.is_alive() and not killed
        replica.kill()
        replica.wait()
        watcher.join(timeout=30)
        assert killed and killed[0] >= 1
        core.wait(timeout=10)  # killed (an orphan left alone would sleep on for two minutes)
    finally:
        replica.kill()


def test_a_part_name_depends_only_on_its_queries():
    from utilrag.annotate.chain import part_name

    assert part_name(["b", "a"]) == part_name(["a", "b"]) != part_name(["a"])


def test_buckets_are_stable_and_complete():
    from utilrag.annotate.prepare import bucket_of, split_by_bucket

    ids = pa.array([f"d{i}" for i in range(1000)])
    assert bucket_of(ids, 7).tolist() == bucket_of(ids, 7).tolist()
    parts = dict(split_by_bucket(pa.table({"doc_id": ids}), "doc_id", 7))
    assert sum(t.num_rows for t in parts.values()) == 1000 and len(parts) == 7
    assert all(set(bucket_of(t["doc_id"], 7).tolist()) == {k} for k, t in parts.items())


def test_resume_plan_keeps_only_the_ids_of_partly_done_files(tmp_path):
    from utilrag.annotate.chain import CHAIN_SCHEMA
    from utilrag.annotate.job import keep_todo, resume_plan
    from utilrag.annotate.prepare import INPUT_SCHEMA

    inputs, parts = tmp_path / "inputs", tmp_path / "chain.parts"
    inputs.mkdir()
    parts.mkdir()
    for j in range(3):
        rows = [{"query_id": f"q{j}{i}", "part": j, "annotate": i != 3} for i in range(4)]
        pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), inputs / f"part-{j:05d}.parquet")
    done = [{"query_id": q, "part": int(q[1])} for q in ["q00", "q01", "q02", "q10"]]  # file 0 complete, 1 partly
    pq.write_table(pa.Table.from_pylist(done, schema=CHAIN_SCHEMA), parts / "part-x.parquet")
    (parts / ".tmp-part-y.parquet").write_bytes(b"half a file")  # ignored
    files, ids, expected, n_done, _ = resume_plan(str(inputs), str(parts))
    assert [Path(f).name for f in files] == ["part-00001.parquet", "part-00002.parquet"]
    assert ids.to_pylist() == ["q10"] and expected == 9 and n_done == 4
    todo = keep_todo(pq.read_table(inputs / "part-00001.parquet"), ids)
    assert todo["query_id"].to_pylist() == ["q11", "q12"]


# --------------------------------------------------------------------------- real engines
def _qwen_tokenizer_dir() -> str:
    try:
        return str(qwen_tokenizer_dir())
    except AnnotateError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> str:
    """A 2-layer Llama with random weights, head size 64, and the Qwen tokenizer's chat template."""
    _qwen_tokenizer_dir()
    return str(make_tiny_llm(tmp_path_factory.mktemp("tiny-llm")))


@pytest.fixture(scope="module")
def annotate_data(tmp_path_factory, shared_datasets, ray_local):
    """DL19 ingested and pooled once for the engine tests."""
    from utilrag.config import PipelineConfig
    from utilrag.data import ingest, run_pools

    out = tmp_path_factory.mktemp("annotate-out")
    cfg = PipelineConfig.model_validate(
        {
            "data_root": str(shared_datasets),
            "output_dir": str(out),
            "ingest": {"datasets": [{"name": "trec-dl-2019"}]},
            "pools": [{"dataset": "trec-dl-2019", "split": "default", "run": "bm25", "size": 31}],
        }
    )
    ingest(cfg)
    run_pools(cfg, cfg.pools[0])
    return shared_datasets, out


def _annotate_config(path: Path, data, model: str, **annotate) -> Path:
    """The annotate section for the tiny model; a dict value (sampling, engine, scale) updates that sub-section."""
    shared, out = data
    section: dict = {
        "model": model,
        "targets": [{"dataset": "trec-dl-2019", "split": "default", "max_queries": 8}],
        "stages": ["relsel"],
        "passage_words": 20,
        "sampling": {"max_tokens": 8},
        "engine": {
            "dtype": "float32",
            "max_model_len": 2048,
            "enforce_eager": True,
            "kv_cache_gib": 1,
            "cpus_per_replica": 1,
        },
        "scale": {"batch_size": 2, "progress_every_s": 1},
    }
    for key, value in annotate.items():
        section[key] = {**section[key], **value} if isinstance(value, dict) else value
    path.write_text(
        yaml.safe_dump(
            {
                "data_root": str(shared),
                "output_dir": str(out),
                "ray": {"num_cpus": 2},
                "ingest": {"datasets": [{"name": "trec-dl-2019"}]},
                "annotate": section,
            }
        )
    )
    return path


def _check_exactly_once(stage_dir: Path, stage: str, queries: int, expected: int | None = None) -> pa.Table:
    """One row per (query, window) in the stage table, one row per query in the chain's parts."""
    table = pq.read_table(stage_dir / f"{stage}.parquet")
    keys = Counter(zip(table.column("query_id").to_pylist(), table.column("window").to_pylist()))
    assert max(keys.values(), default=1) == 1 and (expected is None or table.num_rows == expected)
    parts = pa.concat_tables([pq.read_table(p) for p in (stage_dir / "chain.parts").glob("part-*.parquet")])
    ids = parts.column("query_id").to_pylist()
    assert len(ids) == len(set(ids)) == queries  # no duplicate left behind in the parts either
    rows_in_parts = sum(len(v) for v in parts.column(stage).to_pylist())
    assert rows_in_parts == table.num_rows
    return table


def _kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every process under it: the replicas write their own
    parts, so a replica left running (Ray's processes are not all in the driver's group) would go on
    finishing blocks after its driver died."""
    import psutil

    tree = psutil.Process(pid).children(recursive=True)
    os.killpg(pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def _engine_cores(since: float) -> list:
    """vLLM EngineCore processes started since ``since`` (time.time()), on this machine."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        if (p.info["create_time"] or 0) >= since - 1 and "EngineCore" in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def _reapers() -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if any("reaper.py" in c for c in p.info["cmdline"] or [])]


def _run_cli(config: Path, **env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "utilrag.cli", "annotate", "--config", str(config)]
    return subprocess.run(
        command,
        env={**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", **env},
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )


@pytest.mark.slow
def test_killed_driver_and_dead_replica_still_give_exactly_once(tmp_path, annotate_data, tiny_llm):
    """Run 1 is SIGKILLed (driver and all it started) after a few parts; run 2 resumes, and its
    engine's EngineCore process is SIGKILLed while a block is in flight: the replica exits, Ray
    restarts it with the block retried, and no engine process is left behind. The stage still ends
    with exactly one row per (query, window), and only unfinished queries were redone. Constrained
    decoding is on, so every output must also match the selection format."""
    config = _annotate_config(
        tmp_path / "c.yaml",
        annotate_data,
        tiny_llm,
        output_name="kill",
        # greedy: sampled, the constrained output may spend its 8 tokens on short pieces of "My selection:["
        # (the default sampling's run is the autoscaling test's)
        sampling={"constrained": True, "temperature": 0.0},
    )
    stage_dir = annotate_data[1] / "annotate" / "trec-dl-2019-default-kill"
    parts = stage_dir / "chain.parts"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "utilrag.cli", "annotate", "--config", str(config)]
    log = open(tmp_path / "first.log", "wb")  # a file, not a pipe: a full pipe would stall the job
    first = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 2 and first.poll() is None:
        time.sleep(0.05)
    _kill_tree(first.pid)  # the driver and everything it started (Ray's processes too), mid-job
    first.wait()
    log.close()
    before = sorted(parts.glob("part-*.parquet"))
    assert len(before) >= 2, (tmp_path / "first.log").read_text(errors="replace")[-3000:]
    assert not (stage_dir / "relsel.parquet").exists()  # the job did not finish
    done_before = sum(pq.read_metadata(p).num_rows for p in before)  # queries (one row each)
    queries, expected = 8, 16  # 8 queries x 2 windows (31 -> 16 + 15)
    assert done_before < queries

    # Run 2: its engine's EngineCore process is SIGKILLed while the first block waits (engine ready).
    started = time.time()
    waiting = stage_dir / ".chain.block-waiting"
    waiting.unlink(missing_ok=True)
    log2 = open(tmp_path / "second.log", "wb")
    second = subprocess.Popen(
        command,
        env={**env, "UTILRAG_FAULT_ANNOTATE_BLOCK_DELAY_S": "4"},
        stdout=log2,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO_ROOT,
    )
    try:
        wait_until(
            "run 2's first block",
            lambda _: waiting.exists() or None,
            deadline_s=300,
            logs=[tmp_path / "second.log"],
            process=second,
            pause_s=0.1,
        )
        [core] = _engine_cores(started)
        core.kill()
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text(errors="replace")[-5000:]
    finally:
        if second.poll() is None:
            _kill_tree(second.pid)
        log2.close()
    output = (tmp_path / "second.log").read_text(errors="replace")
    assert f"resuming: {done_before} of {queries} queries already done, {queries - done_before} to go" in output
    [deaths] = [json.loads(p.read_text()) for p in (parts / ".tries").glob("replica-*.json")]
    assert deaths["deaths"] == 1 and deaths["reason"].startswith("EngineDeadError"), deaths
    assert _engine_cores(started) == [] and not _reapers()  # nothing of run 2's engines left behind
    table = _check_exactly_once(stage_dir, "relsel", queries, expected)
    new = 2 * (queries - done_before)
    assert f"{expected} rows ({new} new, {expected - new} resumed)" in output
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert min(table.column("prompt_tokens").to_pylist()) > 100
    assert all(o.startswith("My selection:[") for o in table.column("raw_output").to_pylist())
    assert table.column("constrained").to_pylist() == [True] * expected
    labels = pq.read_table(stage_dir / "labels.parquet")
    assert set(labels.column("source").to_pylist()) == {"human", "relsel"}
    assert labels.num_rows == 2 * 8 * 31
    assert "Agreement with human labels" in output
    # How full the engine was, from vLLM's scheduler per step (AsyncLLM's stat logger): requests
    # running of max_num_seqs, tokens scheduled of max_num_batched_tokens; fractions, and not empty.
    engines = json.loads((stage_dir / "manifest.json").read_text())["engines"]
    assert engines["engine_steps"] > 0 and 0 < engines["engine_fill"] <= 1 and 0 < engines["token_fill"] <= 1
    assert engines["mean_running"] >= 1 and 0 <= engines["kv_cache_use"] <= 1, engines

    third = _run_cli(config)  # finished: no engine starts, the same tables
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "the chain is complete (8 queries)" in third.stdout
    assert pq.read_table(stage_dir / "relsel.parquet").equals(table)


def test_a_replica_killed_with_its_block_half_done_gives_exactly_once(tmp_path, annotate_data, monkeypatch):
    """On the session's Ray cluster, four stages on one stand-in engine per replica (labelled as such: the
    chain's bookkeeping is under test; vLLM's own crash is in the killed-driver test); in its second block
    the replica dies (os._exit: no cleanup, as a SIGKILL) after RelSel and the pseudo-answers ran but
    before UtilSel / UtilRank and before its part was written. Ray restarts it and retries the block
    whole: every stage table holds exactly one row per (query, window), each query is in exactly one
    part, and each replica process started its engine once."""
    from utilrag.annotate import prepare

    stages = ["relsel", "answer", "utilsel", "utilrank"]
    monkeypatch.setenv("UTILRAG_FAULT_ANNOTATE_FAIL_MID_BLOCK", "2")  # read by the driver (this process)
    # The inputs through prepare.py's Ray Data bucket shuffle (3 doc buckets of DL19's 9,383 passages,
    # 3 query buckets of 20 x 31 pool rows; at the defaults this job is one bucket each way: one task).
    monkeypatch.setattr(prepare, "DOCS_PER_BUCKET", 4_000)
    monkeypatch.setattr(prepare, "POOL_ROWS_PER_PART", 7 * 31)
    stage_dir = Path(_stand_in_job(tmp_path, annotate_data, "half", _StandInEngine, stages=stages))
    assert (stage_dir / ".chain.midblock.crashed").exists()
    queries = 20
    relsel = _check_exactly_once(stage_dir, "relsel", queries, queries)  # one window per query
    assert _check_exactly_once(stage_dir, "answer", queries).num_rows == queries
    for stage in stages[2:]:
        assert _check_exactly_once(stage_dir, stage, queries).num_rows > 0
    answered = {
        q
        for q, a in zip(
            *(pq.read_table(stage_dir / "answer.parquet").column(c).to_pylist() for c in ["query_id", "answer"])
        )
        if a
    }
    assert 0 < len(answered) < queries  # the stand-in leaves some pseudo-answers empty
    utilsel_queries = set(pq.read_table(stage_dir / "utilsel.parquet").column("query_id").to_pylist())
    assert utilsel_queries == answered  # UtilSel asked for exactly the queries with a pseudo-answer
    assert relsel.num_rows == queries
    labels = pq.read_table(stage_dir / "labels.parquet")
    assert set(labels.column("source").to_pylist()) == {"human", "relsel", "utilsel", "utilrank"}
    from utilrag.store import read_manifest

    manifest = read_manifest(stage_dir) or {}
    assert manifest["engines"]["engine_starts_per_replica"] == 1
    assert manifest["summaries"]["relsel"]["rows"] == queries
    inputs = read_manifest(stage_dir / "inputs.meta") or {}
    assert (inputs["doc_buckets"], inputs["query_buckets"], inputs["queries"]) == (3, 3, queries), inputs


@pytest.mark.slow
def test_an_engine_that_cannot_start_fails_the_job_with_its_message(tmp_path, annotate_data, tiny_llm):
    from utilrag.annotate import run_annotate
    from utilrag.config import load_config

    # the tiny model knows 4,096 positions: vLLM refuses a longer context at engine start
    config = _annotate_config(
        tmp_path / "c.yaml",
        annotate_data,
        tiny_llm,
        output_name="bad",
        engine={"max_model_len": 100000},
        scale={"engine_start_retries": 0},  # the replacing of failed starts: see the stand-in job test
    )
    t0 = time.time()
    with pytest.raises(AnnotateError, match=r"the vLLM engine did not start: .*max_model_len"):
        run_annotate(load_config(config))
    assert time.time() - t0 < 300


def _stand_in_job(tmp_path, data, name: str, engine_factory, stages=("relsel", "answer"), **scale) -> str:
    """One target of 20 DL19 queries (RelSel in one window: one request per query and wave, then the
    answer, by default) in blocks of 4, on a stand-in engine (pickled by value) in this process's Ray
    cluster."""
    import ray.cloudpickle

    from utilrag.annotate import annotate_target
    from utilrag.config import load_config

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas get the stand-in by value
    config = _annotate_config(
        tmp_path / "c.yaml",
        data,
        "stand-in",
        targets=[{"dataset": "trec-dl-2019", "split": "default", "max_queries": 20}],
        stages=list(stages),
        window=31,
        output_name=name,
        engine={"async_engine": False},
        scale={"batch_size": 4, **scale},
    )
    cfg = load_config(config)
    return annotate_target(cfg, cfg.annotate.targets[0], "stand-in", engine_factory=engine_factory)


class _SlowStandInEngine(_StandInEngine):
    """The stand-in with a fixed latency per generate call (a stand-in: only the job's timing is under test)."""

    delay_s = 2.0

    def generate(self, messages: list, sampling: list) -> dict:
        time.sleep(self.delay_s)
        return super().generate(messages, sampling)


@pytest.mark.slow
def test_a_job_longer_than_ray_datas_no_progress_guard_completes_block_by_block(tmp_path, annotate_data):
    """Time compressed by F = 150. One input file of 20 queries in blocks of 4 takes 5 blocks x 2
    generate waves (RelSel, the answer) x 2 s of the stand-in engine = ~20 s, as a ~1,000-query input
    file takes 35-70 min on one A100 replica: longer than Ray Data's own guard (30 min -> 12 s). Each
    replica task is one block (a streaming repartition), whose output reaches Ray Data when the block
    ends (4 s), so the job completes under that default guard, exactly once (12 s also covers the
    replica's start and its first block on a busy machine). When a task was a whole input file, the same
    job failed with ExecutionTimeoutError (the negative control, run before the change). A guard shorter
    than one block (1 s) fails the job: the guard is on, and set from annotate.scale.no_progress_timeout_s."""
    F = 150

    def run(guard_s: float, name: str) -> str:
        return _stand_in_job(tmp_path, annotate_data, name, _SlowStandInEngine, no_progress_timeout_s=guard_s)

    with pytest.raises(AnnotateError, match="ExecutionTimeoutError"):
        run(1.0, "guard-shorter-than-a-block")
    t0 = time.time()
    out = run(1800 / F, "ray-default-guard")  # Ray Data's default guard, compressed
    assert time.time() - t0 > 1800 / F  # the job outlasted the guard, and went on
    stage_dir = Path(out)
    assert len(list((stage_dir / "inputs").glob("part-*.parquet"))) == 1  # one input file, all 20 queries
    assert len(list((stage_dir / "chain.parts").glob("part-*.parquet"))) == 5  # one part per block of 4
    _check_exactly_once(stage_dir, "relsel", 20, expected=20)


class _FaultyStandIn(_StandInEngine):
    """The stand-in (labelled as such: the job's failure handling is under test, not vLLM) with three
    faults, each once per job through marker files in ``folder``: the first engine start fails; the
    engine of the replica that starts next dies in its second generate call (vLLM's EngineDeadError
    from then on); and every request of the query with the text ``poison`` raises."""

    folder = ""
    poison = ""

    def __init__(self, model: str, engine: dict):
        super().__init__(model, engine)
        self.dead, self.calls, self.error = False, 0, None
        if _first_time(Path(self.folder, "start-failed")):
            self.error = "a stand-in engine that fails its first start"
        self.dies = not self.error and _first_time(Path(self.folder, "will-die"))

    def check(self) -> None:
        if self.error:
            raise RuntimeError(f"the vLLM engine did not start: {self.error}")

    def generate(self, messages: list, sampling: list) -> dict:
        from vllm.v1.engine.exceptions import EngineDeadError

        self.calls += 1
        if self.dead or (self.dies and self.calls == 2):
            self.dead = True
            raise EngineDeadError()
        if any(self.poison in json.dumps(m) for m in messages):
            raise ValueError("a poisoned request")
        return super().generate(messages, sampling)


def _first_time(marker: Path) -> bool:
    try:
        marker.touch(exist_ok=False)
        return True
    except FileExistsError:
        return False


def test_engine_failures_and_a_poisoned_query_in_one_job(tmp_path, annotate_data):
    """On the session's Ray cluster, one job of 20 queries in blocks of 4: a replica whose engine fails
    its first start is replaced; an engine that dies mid-job takes its replica down, which Ray restarts
    with its block retried; the query whose requests always fail is the job's one error row. Every
    other query once. Then the same job with the default max_error_fraction (0.1%) fails, one line."""
    from utilrag.annotate.job import sample_queries
    from utilrag.store import Store

    out = annotate_data[1]
    pools = Path(Store(out).pools("trec-dl-2019", "default")) / "pools.parquet"
    poison_id = sample_queries(str(pools), 20, "annotate:trec-dl-2019:default")[0]  # the job's own sample
    queries = pq.read_table(out / "ingest" / "trec-dl-2019" / "queries").to_pylist()
    poison_text = next(q["text"] for q in queries if q["query_id"] == poison_id)
    _FaultyStandIn.folder, _FaultyStandIn.poison = str(tmp_path), poison_text

    def run(**scale) -> str:
        return _stand_in_job(tmp_path, annotate_data, "faults", _FaultyStandIn, query_tries=2, **scale)

    stage_dir = Path(run(max_error_fraction=0.1))
    assert {p.name for p in tmp_path.iterdir()} >= {"start-failed", "will-die"}
    inputs = pq.read_table(stage_dir / "inputs", columns=["query_id", "annotate"])
    annotated = set(pc.filter(inputs["query_id"], inputs["annotate"]).to_pylist())
    assert poison_id in annotated, "the poisoned query must be among the sampled ones"
    relsel = _check_exactly_once(stage_dir, "relsel", len(annotated))
    assert set(relsel["query_id"].to_pylist()) == annotated - {poison_id}
    errors = pq.read_table(stage_dir / "errors.parquet").to_pylist()
    assert errors == [{"query_id": poison_id, "stage": "relsel", "reason": "2 tries: ValueError: a poisoned request"}]
    # the one engine death: charged to its block (and, as the block's first, to the replica's budget), or
    # to the query then running alone when the poisoned block was being run a query at a time
    records = [json.loads(p.read_text()) for p in (stage_dir / "chain.parts" / ".tries").glob("*.json")]
    assert records and all(r["deaths"] == 1 and r["reason"].startswith("EngineDeadError") for r in records), records
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["errors"]["rows"] == 1
    labels = pq.read_table(stage_dir / "labels.parquet")
    assert poison_id not in set(labels["query_id"].to_pylist())  # an error row has no labels

    with pytest.raises(AnnotateError) as failed:  # the chain is done: no engine starts, the check fails
        run()
    assert str(failed.value).splitlines() == [
        f"trec-dl-2019/default: 1 of {len(annotated)} queries are error rows ({1 / len(annotated):.3%}), above "
        f"annotate.scale.max_error_fraction 0.100%; see {stage_dir}/errors.parquet"
    ]
    assert json.loads((stage_dir / "manifest.json").read_text())["status"] == "failed"
