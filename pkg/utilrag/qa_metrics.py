"""Answer metrics, pure Python (no Ray):

- SQuAD v1.1 exact match and F1, as the official ``evaluate-v1.1.py`` computes them;
- MS MARCO QnA v2.1 BLEU-1..4 and ROUGE-L, as ``ms_marco_eval.py`` computes them with the
  pycocoevalcap ``Bleu(4)`` and ``Rouge()`` scorers (re-implemented here: see ``bleu`` below);
- answer recall: does a retrieved passage contain a gold answer.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from utilrag.errors import UtilragError

_PUNCTUATION = set(string.punctuation)


class QAMetricError(UtilragError):
    """Predictions that cannot be scored against the data (none matching, a bad file)."""


# --------------------------------------------------------------------------- SQuAD v1.1
def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (evaluate-v1.1.py, verbatim logic)."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        return "".join(ch for ch in text if ch not in _PUNCTUATION)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]
) -> float:
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def _no_answer_score(prediction: str) -> float:
    # A question without gold answers (SQuAD v2 unanswerable, MS MARCO "No Answer Present."): v1.1
    # cannot score it (max over nothing), so use evaluate-v2.0.py's rule: right iff the prediction
    # is empty after normalisation, for EM and F1 alike.
    return float(normalize_answer(prediction) == "")


def squad_evaluate(dataset_answers: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict:
    """EM and F1 in percent over every question of the data, as evaluate-v1.1.py: a question without
    a prediction scores 0; prediction ids not in the data are only counted (``unknown``)."""
    if not dataset_answers:
        raise QAMetricError("no questions to score against")
    exact_match = f1 = 0.0
    missing = 0
    for qid, ground_truths in dataset_answers.items():  # summed in data order, as the official script
        if qid not in predictions:
            missing += 1
            continue
        prediction = predictions[qid]
        if not ground_truths:
            exact_match += _no_answer_score(prediction)
            f1 += _no_answer_score(prediction)
            continue
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    total = len(dataset_answers)
    scored = total - missing
    unknown = sum(qid not in dataset_answers for qid in predictions)
    if scored == 0:
        raise QAMetricError(f"none of the {len(predictions):,} prediction ids matches any of the {total:,} questions")
    return {
        "exact_match": 100.0 * exact_match / total,
        "f1": 100.0 * f1 / total,
        "missing": missing,
        "unknown": unknown,
        "scored": scored,
        "questions": total,
    }


# --------------------------------------------------------------------------- MS MARCO: BLEU, ROUGE-L
# pycocoevalcap 1.2 (what ms_marco_eval.py imports) is a 104 MB wheel — METEOR/SPICE jars — and
# requires the compiled pycocotools; its BLEU and ROUGE-L are a few dozen lines, so they live here,
# following bleu/bleu_scorer.py (option "closest") and rouge/rouge.py step for step.
_TINY = 1e-15  # bleu_scorer.py's constants: a zero count gives ~0, never a division by zero
_SMALL = 1e-9


def _ngram_counts(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str], n: int = 4) -> list[float]:
    """Corpus-level BLEU-1..n as pycocoevalcap ``Bleu(n).compute_score`` (whitespace tokens; clipped
    n-gram counts against the max count over references; effective reference length = the reference
    length closest to the candidate's, the shorter on a tie; brevity penalty on the summed lengths)."""
    if set(references) != set(candidates):
        raise QAMetricError("BLEU needs one candidate for every reference id and no other")
    testlen_sum = reflen_sum = 0
    guess = [0] * n
    correct = [0] * n
    for qid, refs in references.items():
        if not refs:
            raise QAMetricError(f"BLEU: no reference for {qid!r}")
        words = candidates[qid].split()
        testlen = len(words)
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            max_ref |= _ngram_counts(ref.split(), n)  # | keeps the max count per n-gram
        reflen = min((abs(len(ref.split()) - testlen), len(ref.split())) for ref in refs)[1]
        testlen_sum += testlen
        reflen_sum += reflen
        for k in range(n):
            guess[k] += max(0, testlen - k)
        for ngram, count in _ngram_counts(words, n).items():
            correct[len(ngram) - 1] += min(max_ref.get(ngram, 0), count)
    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen_sum + _TINY) / (reflen_sum + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_score(candidate: str, refs: Sequence[str], beta: float = 1.2) -> float:
    """pycocoevalcap ``Rouge.calc_score``: the LCS precision and recall are each maximised over the
    references *separately*, then combined into F_beta. Tokens are split on single spaces, as there
    (so an empty string is one empty token)."""
    if not refs:
        raise QAMetricError("ROUGE-L needs at least one reference")
    tokens = candidate.split(" ")
    precisions, recalls = [], []
    for ref in refs:
        ref_tokens = ref.split(" ")
        lcs = _lcs(ref_tokens, tokens)
        precisions.append(lcs / len(tokens))
        recalls.append(lcs / len(ref_tokens))
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta**2) * p * r) / (r + beta**2 * p)


def rouge_l(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str], beta: float = 1.2) -> float:
    """The mean of ``rouge_l_score`` over the ids (pycocoevalcap ``Rouge.compute_score``)."""
    if set(references) != set(candidates):
        raise QAMetricError("ROUGE-L needs one candidate for every reference id and no other")
    if not references:
        raise QAMetricError("ROUGE-L: nothing to score")
    scores = [rouge_l_score(candidates[qid], refs, beta) for qid, refs in references.items()]
    return sum(scores) / len(scores)


def marco_evaluate(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> dict:
    """BLEU-1..4 and ROUGE-L (fractions in [0, 1], as the leaderboard reports them) over the questions
    that have answers, as ms_marco_eval.py (v2.1) scores them: no-answer questions are left out and
    every answered question needs a candidate. Both sides are normalised with ``normalize_answer``
    (the official script lower-cases spaCy tokens instead, keeping punctuation as tokens, so values
    differ slightly from the leaderboard's)."""
    answered = {qid: refs for qid, refs in references.items() if refs}
    missing = [qid for qid in answered if qid not in candidates]
    if missing:
        raise QAMetricError(f"{len(missing):,} answered questions have no candidate answer (e.g. {missing[0]!r})")
    if not answered:
        raise QAMetricError("no question with an answer to score against")
    refs = {qid: [normalize_answer(a) for a in answers] for qid, answers in answered.items()}
    cands = {qid: normalize_answer(candidates[qid]) for qid in answered}
    b = bleu(refs, cands, 4)
    return {
        **{f"bleu_{k + 1}": s for k, s in enumerate(b)},
        "rouge_l": rouge_l(refs, cands),
        "scored": len(answered),
        "no_answer": len(references) - len(answered),
        "unknown": sum(qid not in references for qid in candidates),
    }


# --------------------------------------------------------------------------- retrieval
@functools.cache
def bert_scorer(model: str, num_layers: int | None, batch_size: int):
    """bert-score's scorer, loaded once per process; a model that cannot be loaded is one QAMetricError."""
    from bert_score import BERTScorer

    from utilrag.encoder_spec import resolve_model

    # A model bert-score knows is passed by name (it picks the layer); any other by its local folder.
    try:
        location = model if num_layers is None else resolve_model(model)
        return BERTScorer(model_type=location, num_layers=num_layers, batch_size=batch_size, idf=False)
    except (OSError, ValueError, AssertionError, IndexError) as e:
        raise QAMetricError(
            f"rag.bertscore: model {model!r} (layer {num_layers or 'default'}) not loaded: {e}"
        ) from None


def bert_score_f1(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    model: str,
    num_layers: int | None = None,
    batch_size: int = 64,
) -> float | None:
    """BERTScore F1 (bert-score, no idf weighting, no baseline rescaling): each answer against its
    references (the best-matching one), mean over the questions that have a reference; None if none.
    An empty answer scores 0, as bert-score sets it (and is not encoded: bert-score's empty-input path
    needs a tokenizer method transformers 5 removed)."""
    refs = {q: [r for r in references.get(q) or [] if r.strip()] for q in candidates}
    qids = [q for q in candidates if refs[q]]
    if not qids:
        return None
    said = [q for q in qids if candidates[q].strip()]
    total = 0.0
    if said:
        scorer = bert_scorer(model, num_layers, batch_size)
        _, _, f1 = scorer.score([candidates[q] for q in said], [refs[q] for q in said])
        total = float(f1.sum())
    return total / len(qids)


def answer_recall(passages: Sequence[str], answers: Sequence[str]) -> bool:
    """True when some gold answer occurs in some passage. DPR's "has answer" convention (the answer's
    tokens appear as a contiguous run of the passage's tokens), with SQuAD normalisation in place of
    DPR's tokenizer: both sides go through ``normalize_answer`` and are matched on whole tokens, so
    "art" does not match "party". An answer that normalises to nothing (e.g. "the") never matches."""
    needles = [f" {a} " for a in map(normalize_answer, answers) if a]
    if not needles:
        return False
    haystacks = [f" {normalize_answer(p)} " for p in passages]
    return any(needle in hay for needle in needles for hay in haystacks)
