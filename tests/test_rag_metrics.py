"""Answer metrics (utilrag.qa_metrics) against the official formulas written out here, and
``eval_qa`` on prediction files built from the real SQuAD dev set. No Ray."""

from __future__ import annotations

import gzip
import json
import math
import re
import string
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED
from utilrag.qa_metrics import (
    QAMetricError,
    answer_recall,
    bleu,
    exact_match_score,
    f1_score,
    marco_evaluate,
    normalize_answer,
    rouge_l,
    rouge_l_score,
    squad_evaluate,
)
from utilrag.rag.eval_qa import eval_qa, format_eval_qa, read_predictions

SQUAD_DEV = SHARED / "squad-v1.1-dev" / "dev-v1.1.json.gz"


# --------------------------------------------------------------------------- evaluate-v1.1.py, written out
def official_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1(prediction, ground_truth):
    prediction_tokens = official_normalize(prediction).split()
    ground_truth_tokens = official_normalize(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_em(prediction, ground_truth):
    return official_normalize(prediction) == official_normalize(ground_truth)


def official_evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue  # the official script prints a message and scores 0
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += max(official_em(prediction, gt) for gt in ground_truths)
                f1 += max(official_f1(prediction, gt) for gt in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# --------------------------------------------------------------------------- normalisation corner cases
CASES = [
    ("The Denver Broncos!", ["Denver Broncos"]),
    ("an apple a day", ["apple day", "An Apple"]),
    ("theory of the anthem", ["theory anthem"]),  # \b: "the" inside words stays
    ("U.S.", ["US", "United States"]),
    ("Café  Müller", ["café müller", "cafe muller"]),  # é is a letter, not stripped, not folded
    ("New\u00a0York City", ["new york city"]),  # a non-breaking space is whitespace to str.split
    ("1,000–2,000", ["1000 2000", "1000–2000"]),  # the en dash is not in string.punctuation
    ("«quoted» text", ["quoted text"]),  # nor are guillemets
    ("", ["something"]),
    ("a the an", ["the"]),  # only articles: normalises to nothing on both sides
    ("cat cat dog", ["cat dog dog", "bird"]),  # repeated tokens: Counter overlap
    ("Denver", ["Denver Broncos", "the Broncos of Denver", "Denver"]),  # several golds: max
]


@pytest.mark.parametrize("prediction,golds", CASES)
def test_squad_metrics_match_the_official_formulas(prediction, golds):
    assert normalize_answer(prediction) == official_normalize(prediction)
    for gold in golds:
        assert normalize_answer(gold) == official_normalize(gold)
        assert exact_match_score(prediction, gold) == official_em(prediction, gold)
        assert f1_score(prediction, gold) == pytest.approx(official_f1(prediction, gold), abs=1e-9)
    result = squad_evaluate({"q": golds}, {"q": prediction})
    assert result["exact_match"] == pytest.approx(100.0 * max(official_em(prediction, g) for g in golds), abs=1e-9)
    assert result["f1"] == pytest.approx(100.0 * max(official_f1(prediction, g) for g in golds), abs=1e-9)


def test_normalisation_by_hand():
    assert normalize_answer("The  Cat, the HAT & a bat.") == "cat hat bat"
    assert normalize_answer("Café\u00a0Müller") == "café müller"
    assert normalize_answer("1,000–2,000") == "1000–2000"
    # pred tokens [cat, sat], gold [cat, sat, down]: P = 1, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8, abs=1e-12)
    # pred [cat, cat, dog] vs gold [cat, dog, dog]: overlap min counts cat 1 + dog 1 = 2; P = R = 2/3
    assert f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3, abs=1e-12)
    assert exact_match_score("A cat!", "cat") is True


def test_squad_evaluate_counts_missing_unknown_and_no_answer():
    data = {"a": ["Ann"], "b": ["Bob"], "c": ["Cy"], "d": []}  # d: unanswerable (SQuAD v2 style)
    result = squad_evaluate(data, {"a": "ann", "b": "Bob Smith", "d": "", "zz": "?"})
    # a: EM 1, F1 1; b: EM 0, F1 2*(1/2*1)/(1/2+1) = 2/3; c: missing 0; d: empty prediction right 1
    assert result["exact_match"] == pytest.approx(100 * 2 / 4, abs=1e-9)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 4, abs=1e-9)
    assert (result["missing"], result["unknown"], result["scored"], result["questions"]) == (1, 1, 3, 4)
    assert squad_evaluate({"d": []}, {"d": "something"})["f1"] == 0.0
    with pytest.raises(QAMetricError, match="none of the 1 prediction ids matches any of the 4 questions"):
        squad_evaluate(data, {"x": "y"})
    with pytest.raises(QAMetricError):
        squad_evaluate({}, {"x": "y"})


# --------------------------------------------------------------------------- eval_qa on the real SQuAD dev
@pytest.fixture(scope="module")
def squad_raw():
    if not SQUAD_DEV.is_file():
        pytest.skip(f"real datasets not found at {SHARED}")
    with gzip.open(SQUAD_DEV, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    qas = [qa for article in data for p in article["paragraphs"] for qa in p["qas"]]
    return data, qas


def dump(path: Path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def test_eval_qa_on_real_squad(tmp_path, squad_raw):
    data, qas = squad_raw
    gold = {qa["id"]: qa["answers"][0]["text"] for qa in qas}
    r = eval_qa(str(SQUAD_DEV), dump(tmp_path / "gold.json", gold))
    assert (r["exact_match"], r["f1"]) == (100.0, 100.0)
    assert (r["missing"], r["unknown"], r["scored"], r["questions"], r["data_rejects"]) == (0, 0, 10_570, 10_570, 0)

    r = eval_qa(str(SQUAD_DEV), dump(tmp_path / "empty.json", {q: "" for q in gold}))
    # Not quite 0: three questions have a gold answer that normalises to "" (so "" matches it
    # exactly, as in the official script); F1 is 0 since an empty prediction shares no token.
    blank = sum(any(not official_normalize(a["text"]) for a in qa["answers"]) for qa in qas)
    assert blank == 3 and r["exact_match"] == pytest.approx(100.0 * blank / 10_570, abs=1e-12) and r["f1"] == 0.0

    half = dict(list(gold.items())[::2])  # every other question: 5,285 answered, 5,285 missing
    r = eval_qa(str(SQUAD_DEV), dump(tmp_path / "half.json", half))
    assert r["missing"] == 5_285 and r["scored"] == 5_285
    assert r["exact_match"] == pytest.approx(100.0 * 5_285 / 10_570, abs=1e-9) == pytest.approx(50.0)
    assert r["f1"] == pytest.approx(50.0, abs=1e-9)

    # A realistic mix (partial answers, wrong answers, missing, unknown ids) against the official loop.
    mixed = {}
    for i, qa in enumerate(qas):
        words = qa["answers"][-1]["text"].split()
        if i % 5 == 0:
            mixed[qa["id"]] = " ".join(words[:-1]) or "nothing"
        elif i % 5 == 1:
            mixed[qa["id"]] = f"the {' '.join(words)} and more words"
        elif i % 5 == 2:
            mixed[qa["id"]] = qas[(i + 7) % len(qas)]["answers"][0]["text"]
        elif i % 5 == 3:
            mixed[qa["id"]] = qa["answers"][-1]["text"].upper() + "."
    mixed.update({"unknown-1": "x", "unknown-2": "y"})
    r = eval_qa(str(SQUAD_DEV), dump(tmp_path / "mixed.json", mixed))
    official = official_evaluate(data, mixed)
    assert r["exact_match"] == pytest.approx(official["exact_match"], abs=1e-9)
    assert r["f1"] == pytest.approx(official["f1"], abs=1e-9)
    assert r["missing"] == 10_570 // 5 and r["unknown"] == 2

    # The same predictions as JSON lines score the same.
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("".join(json.dumps({"query_id": q, "answer": a}) + "\n" for q, a in mixed.items()))
    assert eval_qa(str(SQUAD_DEV), str(jsonl)) == r

    with pytest.raises(QAMetricError, match="none of the 2 prediction ids matches"):
        eval_qa(str(SQUAD_DEV), dump(tmp_path / "none.json", {"x": "a", "y": "b"}))


# --------------------------------------------------------------------------- prediction files
def test_read_predictions_forms(tmp_path):
    assert read_predictions(dump(tmp_path / "p.json", {"a": "x", "b": ""})) == {"a": "x", "b": ""}
    one = tmp_path / "one.jsonl"
    one.write_text('{"query_id": 5, "answer": "x"}\n')
    assert read_predictions(str(one)) == {"5": "x"}
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"query_id": "a", "answer": "x"}\n\n{"query_id": "b", "answer": "y"}\n'))
    assert read_predictions(str(gz)) == {"a": "x", "b": "y"}


@pytest.mark.parametrize(
    "text,message",
    [
        ('["a", "b"]', "expected a JSON object {question_id: answer} or JSON lines"),
        ('{"a": 1}', "the answer for 'a' is not a string"),
        ("{broken", "malformed JSON (Expecting property name"),
        ("", "no predictions (empty file)"),
        ('{"query_id": "a", "answer": "x"}\n{"query_id": "b", "answer": "y"}\n{"query_id": "c"}\n', "line 3: expected"),
        ('{"query_id": "a", "answer": "x"}\nnot json\n', "line 2: malformed JSON"),
        ('{"query_id": "a", "answer": "x"}\n{"query_id": "a", "answer": "y"}\n', "line 2: duplicate query_id 'a'"),
        (
            '{"query_id": "a", "answer": "x"}\n{"query_id": "b", "answer": 3}\n',
            "line 2: answer for 'b' is not a string",
        ),
    ],
)
def test_bad_prediction_files(tmp_path, text, message):
    path = tmp_path / "pred.json"
    path.write_text(text)
    with pytest.raises(QAMetricError) as e:
        read_predictions(str(path))
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_missing_prediction_file(tmp_path):
    with pytest.raises(QAMetricError, match="cannot open"):
        read_predictions(str(tmp_path / "nope.json"))


def test_format_eval_qa():
    result = {"exact_match": 81.25, "f1": 88.5, "missing": 2, "unknown": 1, "scored": 8, "questions": 10}
    assert json.loads(format_eval_qa(result, True)) == result
    text = format_eval_qa({**result, "data_rejects": 3}, False)
    assert text.splitlines()[:2] == ["exact_match 81.25", "f1          88.50"]
    assert "scored 8 of 10 questions (missing predictions 2, unknown prediction ids 1)" in text
    assert "3 unreadable questions" in text


# --------------------------------------------------------------------------- BLEU (pycocoevalcap bleu_scorer.py)
TINY, SMALL = 1e-15, 1e-9  # bleu_scorer.py's smoothing constants


def geo(counts: list[tuple[int, int]], testlen: int, reflen: int) -> list[float]:
    """BLEU-1..n = (prod_{i<=k} (correct_i + tiny) / (guess_i + small))^(1/k) * BP, where with
    ratio = (testlen + tiny) / (reflen + small), BP = exp(1 - 1/ratio) if ratio < 1 else 1. Note that
    equal lengths give ratio just under 1, so a BP of 1 - ~1e-10 (pycocoevalcap does the same)."""
    out, product = [], 1.0
    ratio = (testlen + TINY) / (reflen + SMALL)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    for k, (correct, guess) in enumerate(counts, start=1):
        product *= (correct + TINY) / (guess + SMALL)
        out.append(product ** (1 / k) * bp)
    return out


def test_bleu_one_segment():
    # "a b c d" vs "a b c e": 1-grams 3/4, 2-grams (ab, bc) 2/3, 3-grams (abc) 1/2, 4-grams 0/1; lengths equal.
    got = bleu({"q": ["a b c e"]}, {"q": "a b c d"})
    assert got == pytest.approx(geo([(3, 4), (2, 3), (1, 2), (0, 1)], 4, 4), rel=1e-12)
    assert got[:3] == pytest.approx([0.75, math.sqrt(0.5), 0.25 ** (1 / 3)], rel=1e-8)
    assert got[3] < 1e-3  # no 4-gram match: ~(0.25 * 1e-15)^(1/4)


def test_bleu_clipping_closest_length_and_brevity():
    # "the the the": unigram "the" clipped to its max count in any one reference (1): 1/3; bigrams 0/2.
    # closest reference length to 3 among (2, 5) is 2: ratio 3/2 >= 1, no brevity penalty.
    got = bleu({"q": ["the cat", "the cat sat on mat"]}, {"q": "the the the"}, n=2)
    assert got == pytest.approx(geo([(1, 3), (0, 2)], 3, 2), rel=1e-12)
    # tie between lengths 2 and 4 for a 3-token candidate: the shorter (2) wins, so no penalty.
    assert bleu({"q": ["a b", "a b c d"]}, {"q": "a b c"}, n=1) == pytest.approx([1.0], rel=1e-8)
    # "a b" vs "a b c d": all n-grams right, ratio 2/4 -> BP = exp(1 - 1/ratio) = exp(-1).
    got = bleu({"q": ["a b c d"]}, {"q": "a b"}, n=2)
    assert got == pytest.approx(geo([(2, 2), (1, 1)], 2, 4), rel=1e-12)
    assert got[0] == pytest.approx(math.exp(-1), rel=1e-8)


def test_bleu_is_corpus_level():
    # counts are summed over segments before the ratio: bigrams 1 (a b) + 0 (c d) of 2.
    got = bleu({"1": ["a b"], "2": ["c e"]}, {"1": "a b", "2": "c d"}, n=2)
    assert got == pytest.approx(geo([(3, 4), (1, 2)], 4, 4), rel=1e-12)
    assert got[1] == pytest.approx(math.sqrt(0.75 * 0.5), rel=1e-8)  # not the mean of segment scores (~0.5)
    with pytest.raises(QAMetricError):
        bleu({"1": ["a"]}, {"2": "a"})


# --------------------------------------------------------------------------- ROUGE-L (pycocoevalcap rouge.py)
def rouge_f(p: float, r: float, beta: float = 1.2) -> float:
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e f") = 3 (a c d): P = 3/4, R = 3/5.
    assert rouge_l_score("a b c d", ["a c d e f"]) == pytest.approx(rouge_f(3 / 4, 3 / 5), abs=1e-12)
    assert rouge_f(3 / 4, 3 / 5) == pytest.approx(2.44 * 0.45 / 1.68, abs=1e-12)
    # P and R are maximised separately over references: ref 1 gives P 2/4 R 1, ref 2 gives P 1 R 4/8.
    assert rouge_l_score("a b c d", ["a b", "a b c d e f g h"]) == pytest.approx(1.0, abs=1e-12)
    assert rouge_l_score("", ["a"]) == 0.0 and rouge_l_score("x y", ["a b"]) == 0.0
    # the corpus value is the mean over ids
    assert rouge_l({"1": ["a b"], "2": ["a c d e f"]}, {"1": "a b", "2": "a b c d"}) == pytest.approx(
        (1.0 + rouge_f(3 / 4, 3 / 5)) / 2, abs=1e-12
    )


def test_marco_evaluate_normalises_and_skips_no_answer():
    refs = {"1": ["The Cat."], "2": ["a b c e"], "3": []}  # 3: "No Answer Present." -> not scored
    got = marco_evaluate(refs, {"1": "cat", "2": "A B C D", "3": "whatever", "9": "x"})
    # after normalize_answer: ("cat" vs "cat") and ("b c d" vs "b c e"): unigrams 1 + 2 of 1 + 3 = 3/4
    assert got["bleu_1"] == pytest.approx(geo([(3, 4)], 4, 4)[0], rel=1e-12)
    assert got["rouge_l"] == pytest.approx((1.0 + rouge_f(2 / 3, 2 / 3)) / 2, abs=1e-12)
    assert (got["scored"], got["no_answer"], got["unknown"]) == (2, 1, 1)
    with pytest.raises(QAMetricError, match="have no candidate answer"):
        marco_evaluate(refs, {"1": "cat"})


# --------------------------------------------------------------------------- answer recall
def test_answer_recall():
    passages = ["The Denver Broncos won Super Bowl 50.", "A party was held."]
    assert answer_recall(passages, ["denver broncos"])
    assert answer_recall(passages, ["nope", "Super Bowl 50"])
    assert not answer_recall(passages, ["art"])  # whole tokens: not inside "party"
    assert not answer_recall(passages, ["the"])  # normalises to nothing: never a hit
    assert answer_recall(["Paris, France"], ["paris france"])  # punctuation removed on both sides
    assert not answer_recall([], ["x"]) and not answer_recall(passages, [])


def test_rag_scores_recall_against_the_gold_ids_only_on_the_qa_sets_own_passages():
    """recall@k: a gold passage id among the top k (the QA set's own passages); over another corpus
    (rag.corpus) the ids differ, so retrieved rows get none while the oracle row keeps its own; answer
    recall reads the passages' texts either way."""
    import pyarrow as pa

    from utilrag.rag import score

    questions = pa.table({"query_id": ["a", "b"], "answers": [["Paris"], ["blue"]], "gold_doc_ids": [["d1"], ["d2"]]})
    rows = [
        {"label": "bm25s", "k": 2, "docs": {"a": ["d3", "d1"], "b": ["d3", "d4"]}, "gold": False},
        {"label": "oracle", "k": 1, "docs": {"a": ["d1"], "b": ["d2"]}, "gold": True},
    ]
    texts = {"d1": "Paris is in France", "d2": "the sky is blue", "d3": "nothing here", "d4": "blue whales"}
    generated = pa.table(
        {
            "query_id": ["a", "b", "a", "b"],
            "window": [0, 0, 1, 1],
            "answer": ["Paris", "red", "Paris", "blue"],
            "output_tokens": [1, 1, 1, 1],
            "finish_reason": ["stop"] * 4,
        }
    )
    own = score(questions, rows, generated, [texts, texts])
    assert [(r["label"], r["query_id"], r["recall"], r["answer_recall"]) for r in own] == [
        ("bm25s", "a", 1.0, 1.0), ("bm25s", "b", 0.0, 1.0), ("oracle", "a", 1.0, 1.0), ("oracle", "b", 1.0, 1.0),
    ]  # fmt: skip
    assert [r["exact_match"] for r in own] == [1.0, 0.0, 1.0, 1.0]
    other = score(questions, rows, generated, [texts, texts], same_ids=False)
    assert [r["recall"] for r in other] == [None, None, 1.0, 1.0]
    assert [r["answer_recall"] for r in other] == [r["answer_recall"] for r in own]


# --------------------------------------------------------------------------- BERTScore
MINILM = {"model": "sentence-transformers/all-MiniLM-L6-v2", "num_layers": 6}


def test_bert_score_takes_the_best_reference_and_averages_over_answered_questions():
    from utilrag.qa_metrics import bert_score_f1

    same = bert_score_f1({"q": ["the cat sat on the mat"]}, {"q": "the cat sat on the mat"}, **MINILM)
    assert same == pytest.approx(1.0, abs=1e-4)
    good = bert_score_f1({"q": ["Denver Broncos"]}, {"q": "the Broncos"}, **MINILM)
    bad = bert_score_f1({"q": ["a recipe for pancakes"]}, {"q": "the Broncos"}, **MINILM)
    assert good is not None and bad is not None and good > bad
    # the best-matching reference counts, whatever the others
    both = bert_score_f1({"q": ["a recipe for pancakes", "Denver Broncos"]}, {"q": "the Broncos"}, **MINILM)
    assert both == pytest.approx(good, abs=1e-6)
    # a question without a reference is left out of the mean; none at all: None
    mean = bert_score_f1(
        {"a": ["the cat sat on the mat"], "b": ["Denver Broncos"], "c": []},
        {"a": "the cat sat on the mat", "b": "the Broncos", "c": "anything"},
        **MINILM,
    )
    assert mean == pytest.approx((same + good) / 2, abs=1e-4)
    assert bert_score_f1({"c": []}, {"c": "anything"}, **MINILM) is None
    # an empty answer scores 0 (bert-score's rule), and counts in the mean
    with_empty = bert_score_f1(
        {"a": ["the cat sat on the mat"], "d": ["x y"]}, {"a": "the cat sat on the mat", "d": " "}, **MINILM
    )
    assert with_empty == pytest.approx(same / 2, abs=1e-4)


def test_bert_score_config_names_the_missing_layer():
    from utilrag.config import BertScoreConfig, bert_score_layers

    assert bert_score_layers()["roberta-large"] == 17  # read from bert-score's own table, without importing it
    assert BertScoreConfig().model == "roberta-large"  # bert-score's English default: its layer is known
    with pytest.raises(ValueError, match="set rag.bertscore.num_layers"):
        BertScoreConfig(model="sentence-transformers/all-MiniLM-L6-v2")
