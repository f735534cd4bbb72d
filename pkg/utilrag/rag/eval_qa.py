"""``utilrag eval-qa``: score a predictions file against any QA file with the official SQuAD v1.1 EM/F1.

Predictions are the official SQuAD form, one JSON object ``{question_id: answer}``, or JSON lines
``{"query_id": ..., "answer": ...}`` (what a generator writes naturally). No Ray.
"""

from __future__ import annotations

import json

from utilrag.data.qa import QADataError, read_bytes, read_qa
from utilrag.qa_metrics import QAMetricError, squad_evaluate

_JSONL_KEYS = {"query_id", "answer"}


def _jsonl_predictions(location: str, lines: list[str]) -> dict[str, str]:
    predictions: dict[str, str] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # a trailing or separating blank line carries nothing
        where = f"{location} line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QAMetricError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or "query_id" not in obj or "answer" not in obj:
            raise QAMetricError(f'{where}: expected an object {{"query_id": ..., "answer": "..."}}')
        qid, answer = obj["query_id"], obj["answer"]
        if isinstance(qid, int) and not isinstance(qid, bool):
            qid = str(qid)
        if not isinstance(qid, str) or not qid:
            raise QAMetricError(f"{where}: query_id is not a non-empty string")
        if not isinstance(answer, str):
            raise QAMetricError(f"{where}: answer for {qid!r} is not a string")
        if qid in predictions:
            raise QAMetricError(f"{where}: duplicate query_id {qid!r}")
        predictions[qid] = answer
    return predictions


def read_predictions(location: str) -> dict[str, str]:
    """question id -> predicted answer, from either accepted form; QAMetricError naming the file otherwise."""
    try:
        text = read_bytes(location).decode("utf-8-sig")
    except QADataError as e:
        raise QAMetricError(f"predictions: {e}") from None
    except UnicodeDecodeError as e:
        raise QAMetricError(f"{location}: not UTF-8 (byte {e.start})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise QAMetricError(f"{location}: no predictions (empty file)")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        if len(lines) > 1:
            return _jsonl_predictions(location, text.splitlines())
        raise QAMetricError(f"{location}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(whole, dict):
        raise QAMetricError(
            f'{location}: expected a JSON object {{question_id: answer}} or JSON lines {{"query_id", "answer"}}, '
            f"found a JSON {type(whole).__name__}"
        )
    if len(lines) == 1 and set(whole) == _JSONL_KEYS:
        return _jsonl_predictions(location, lines)  # one JSON line, not a mapping with those two ids
    bad = next((qid for qid, answer in whole.items() if not isinstance(answer, str)), None)
    if bad is not None:
        raise QAMetricError(f"{location}: the answer for {bad!r} is not a string")
    return whole


def eval_qa(data_path: str, predictions_path: str) -> dict:
    """squad_evaluate's dict for the predictions against the data's answers, plus ``data_rejects``
    (questions the data file had that could not be read, so were not scored)."""
    data = read_qa(data_path)
    result = squad_evaluate(data.answers(), read_predictions(predictions_path))
    result["data_rejects"] = len(data.rejects)
    return result


def format_eval_qa(result: dict, as_json: bool) -> str:
    """One JSON object (full precision) for ``--json``; otherwise a short text summary."""
    if as_json:
        return json.dumps(result)
    lines = [
        f"exact_match {result['exact_match']:.2f}",
        f"f1          {result['f1']:.2f}",
        f"scored {result['scored']:,} of {result['questions']:,} questions "
        f"(missing predictions {result['missing']:,}, unknown prediction ids {result['unknown']:,})",
    ]
    if result.get("data_rejects"):
        lines.append(f"the data file had {result['data_rejects']:,} unreadable questions (not scored)")
    return "\n".join(lines)
