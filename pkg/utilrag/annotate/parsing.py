"""Reading the model's answers: ``[n]`` identifiers (docs/method.md §2), and a 0-3 grade.

Every ``[n]`` in the output is an identifier (regex ``\\[(\\d+)\\]``). Ids outside 1..num and
repeats are ignored and counted. Parse status:
- ``ok``: at least one valid id (or, for a selection, the explicit empty answer ``My selection:[]``);
- ``no_valid_ids``: ids were written but none is in range;
- ``unparsed``: no id at all (and no explicit empty selection);
- ``prompt_too_long`` / ``engine_error``: set by the engine side, nothing was generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ID_PATTERN = re.compile(r"\[(\d+)\]")
EMPTY_SELECTION = re.compile(r"My selection:\s*\[\s*\]")
GRADE_PATTERN = re.compile(r"final score:\s*\**\s*([0-3])\b", re.IGNORECASE)
BARE_GRADE = re.compile(r"^\s*([0-3])\b")


@dataclass
class Parsed:
    ids: list[int] = field(default_factory=list)  # 1-based, in output order, valid and unique
    status: str = "unparsed"
    invalid_ids: int = 0
    repeated_ids: int = 0


def parse_ids(text: str, num: int, allow_empty_selection: bool = True) -> Parsed:
    found = [int(m) for m in ID_PATTERN.findall(text)]
    out = Parsed()
    seen: set[int] = set()
    for n in found:
        if not 1 <= n <= num:
            out.invalid_ids += 1
        elif n in seen:
            out.repeated_ids += 1
        else:
            seen.add(n)
            out.ids.append(n)
    if out.ids:
        out.status = "ok"
    elif found:
        out.status = "no_valid_ids"
    elif allow_empty_selection and EMPTY_SELECTION.search(text):
        out.status = "ok"
    return out


def parse_grade(text: str) -> tuple[int | None, str]:
    """The judge's 0-3 grade: ``##final score: N``, else an answer that is just a digit."""
    m = GRADE_PATTERN.search(text) or BARE_GRADE.search(text)
    if m:
        return int(m.group(1)), "ok"
    return None, "unparsed"


def top_percent(n: int, percent: float) -> int:
    """UtilRank positives: the top k% of the ranked passages, rounded down, at least 1."""
    return max(1, int(n * percent / 100))
