"""QA readers (utilrag.data.qa): the real SQuAD / NQ-open dev files, and every format on small
synthetic files with bad records -> rejects with the right line and reason. No Ray."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import SHARED
from utilrag.data.qa import (
    CORPUS_SCHEMA,
    QA_SCHEMA,
    READERS,
    QADataError,
    detect_format,
    read_qa,
    resolve_qa,
)
from utilrag.data.registry import REGISTRY

SQUAD_DEV = SHARED / "squad-v1.1-dev" / "dev-v1.1.json.gz"
NQ_DEV = SHARED / "nq-open-dev" / "NQ-open.dev.jsonl.gz"


def write(path: Path, text: str, gz: bool = False) -> str:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def reasons(data) -> list[tuple[int, str]]:
    return [(r["line"], r["reason"]) for r in data.rejects]


# --------------------------------------------------------------------------- the real files
@pytest.fixture(scope="module")
def squad_dev():
    if not SQUAD_DEV.is_file():
        pytest.skip(f"real datasets not found at {SHARED}")
    return read_qa(str(SQUAD_DEV))


def test_real_squad_dev(squad_dev):
    d = squad_dev
    assert d.format == "squad"
    assert d.qa.schema == QA_SCHEMA and d.corpus.schema == CORPUS_SCHEMA
    assert d.qa.num_rows == 10_570 and d.corpus.num_rows == 2_067 and d.rejects == []
    answers = d.qa.column("answers").to_pylist()
    assert sum(map(len, answers)) == 34_726 == d.stats["answers"]
    assert min(map(len, answers)) == 1 and max(map(len, answers)) == 6
    doc_ids = d.corpus.column("doc_id").to_pylist()
    assert len(set(doc_ids)) == 2_067 and not any(any(c.isspace() for c in i) for i in doc_ids)
    assert len(set(d.corpus.column("title").to_pylist())) == 48
    golds = d.qa.column("gold_doc_ids").to_pylist()
    assert all(len(g) == 1 for g in golds) and {g[0] for g in golds} <= set(doc_ids)
    assert len(set(d.qa.column("query_id").to_pylist())) == 10_570
    first = d.qa.slice(0, 1).to_pylist()[0]
    assert first["gold_doc_ids"] == ["Super_Bowl_50#0"] and first["answers"][0] == "Denver Broncos"


def test_real_nq_open_dev():
    if not NQ_DEV.is_file():
        pytest.skip(f"real datasets not found at {SHARED}")
    assert detect_format(str(NQ_DEV)) == "nq-open"
    d = read_qa(str(NQ_DEV))
    assert d.qa.num_rows == 3_610 and d.rejects == [] and d.corpus.num_rows == 0
    assert sum(len(a) for a in d.qa.column("answers").to_pylist()) == 6_490
    assert d.qa.column("query_id").to_pylist()[:2] == ["nq-1", "nq-2"]
    assert all(g == [] for g in d.qa.column("gold_doc_ids").to_pylist())


def test_resolve_registered_sets(tmp_path):
    if not SQUAD_DEV.is_file():
        pytest.skip(f"real datasets not found at {SHARED}")
    assert resolve_qa("squad-v1.1-dev", SHARED) == str(SQUAD_DEV)
    assert resolve_qa("nq-open-dev", str(SHARED)) == str(NQ_DEV)
    with pytest.raises(QADataError) as e:
        resolve_qa("hotpotqa-dev-distractor", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "hotpotqa-dev-distractor") in msg and "hotpot_dev_distractor_v1.json" in msg
    assert "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json" in msg and "\n" not in msg


def test_resolve_finds_either_compression_and_paths(tmp_path):
    folder = tmp_path / "msmarco-qna-v2.1-dev"
    folder.mkdir()
    plain = write(folder / "dev_v2.1.json", "{}")  # published as .gz; an unpacked copy is found too
    assert resolve_qa("msmarco-qna-v2.1-dev", tmp_path) == plain
    path = write(tmp_path / "mine.jsonl", "")
    assert resolve_qa(path, None) == path
    with pytest.raises(QADataError, match="neither an existing file nor a registered QA set"):
        resolve_qa(str(tmp_path / "nope.json"), tmp_path)


def test_registered_sets_name_official_urls():
    qa_sets = {name: reg for name, reg in REGISTRY.items() if reg.kind == "qa"}  # one registry, kind ir | qa
    assert qa_sets["squad-v1.1-dev"].downloads == [
        ("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json", "dev-v1.1.json")
    ]
    assert (
        qa_sets["squad-v2.0-dev"].downloads[0][0] == "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"
    )
    assert qa_sets["nq-open-dev"].qa_file == "NQ-open.dev.jsonl"
    assert qa_sets["msmarco-qna-v2.1-dev"].downloads[0][0] == (
        "https://msmarco.z22.web.core.windows.net/msmarco/dev_v2.1.json.gz"
    )
    assert qa_sets["msmarco-qna-v2.1-train"].downloads[0][0] == (
        "https://msmarco.z22.web.core.windows.net/msmarco/train_v2.1.json.gz"  # the QA-metric labels' answers
    )
    assert {reg.qa_format for reg in qa_sets.values()} == set(READERS)
    assert len(qa_sets) == 10 and REGISTRY["scifact"].kind == "ir"


# --------------------------------------------------------------------------- SQuAD
def squad_doc(version: str = "1.1") -> dict:
    good = {"id": "q1", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]}
    return {
        "version": version,
        "data": [
            {
                "title": "Some Title",
                "paragraphs": [
                    {
                        "context": "Ann wrote it.",
                        "qas": [
                            good,  # 1
                            {"id": "q2", "question": "  ", "answers": [{"text": "x"}]},  # 2: empty question
                            {**good, "question": "Again?"},  # 3: duplicate id
                            "not an object",  # 4
                            {"id": "q5", "question": "What?", "answers": [{"text": "it"}, {"text": "it"}]},  # 5
                        ],
                    },
                    {"context": "", "qas": [{"id": "q6", "question": "Lost?", "answers": [{"text": "y"}]}]},  # 6
                ],
            },
            {
                "title": "Other",
                "paragraphs": [
                    {
                        "context": "Bob.",
                        "qas": [
                            {"id": "q7", "question": "Who else?", "answers": [{"text": "Bob"}]},  # 7
                            {"id": "q8", "question": "None?", "answers": []},  # 8: no answers, not v2
                            {"id": "q9", "question": "Bad?", "answers": ["Bob"]},  # 9: answers not objects
                        ],
                    }
                ],
            },
            "not an article",
        ],
    }


@pytest.mark.parametrize("gz", [False, True])
def test_squad_reader_rows_and_rejects(tmp_path, gz):
    path = write(tmp_path / ("dev.json.gz" if gz else "dev.json"), json.dumps(squad_doc()), gz)
    assert detect_format(path) == "squad"
    d = read_qa(path)
    rows = d.qa.to_pylist()
    assert [r["query_id"] for r in rows] == ["q1", "q5", "q7"]
    assert rows[0] == {"query_id": "q1", "question": "Who?", "answers": ["Ann"], "gold_doc_ids": ["Some_Title#0"]}
    assert rows[1]["answers"] == ["it", "it"]  # duplicates kept, as the official data has them
    assert rows[2]["gold_doc_ids"] == ["Other#0"]
    assert d.corpus.to_pylist() == [
        {"doc_id": "Some_Title#0", "title": "Some Title", "text": "Ann wrote it."},
        {"doc_id": "Other#0", "title": "Other", "text": "Bob."},
    ]
    assert reasons(d) == [
        (2, "missing or empty question text"),
        (3, "duplicate question id 'q1'"),
        (4, "question is not an object"),
        (6, "article 1 paragraph 1 has an empty or missing context"),
        (8, "no answers (and not marked is_impossible)"),
        (9, "answers is not a list of {'text': string} objects"),
        (10, "article 3 is not an object with a 'paragraphs' list"),
    ]
    assert all(r["file"] == path for r in d.rejects)
    assert json.loads(d.rejects[0]["raw"])["id"] == "q2"
    assert d.stats["questions"] == 3 and d.stats["rejects"] == 7 and d.stats["corpus"] == 2


def test_squad_v2_unanswerable_kept_and_counted(tmp_path):
    doc = {
        "version": "v2.0",
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "c",
                        "qas": [
                            {"id": "a", "question": "q?", "answers": [{"text": "c"}], "is_impossible": False},
                            {
                                "id": "b",
                                "question": "q2?",
                                "answers": [],
                                "plausible_answers": [],
                                "is_impossible": True,
                            },
                        ],
                    }
                ],
            }
        ],
    }
    d = read_qa(write(tmp_path / "dev-v2.0.json", json.dumps(doc)))
    assert d.rejects == [] and d.stats["unanswerable"] == 1
    assert d.qa.column("answers").to_pylist() == [["c"], []]


def test_squad_malformed_json_names_file_and_position(tmp_path):
    path = write(tmp_path / "dev.json", '{"data": [{"title": "x",\n "paragraphs": [}]}')
    with pytest.raises(QADataError) as e:
        read_qa(path, format="squad")
    assert str(e.value).startswith(f"{path}: malformed JSON") and "line 2 column" in str(e.value)
    with pytest.raises(QADataError, match="truncated or corrupt gzip"):
        read_qa(_truncated(tmp_path))


def _truncated(tmp_path: Path) -> str:
    data = gzip.compress(json.dumps(squad_doc()).encode())
    path = tmp_path / "truncated.json.gz"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


# --------------------------------------------------------------------------- NQ-open
NQ_LINES = [
    '{"question": "who?", "answer": ["Ann", "Anne"]}',  # 1
    '{"question": "broken", "answer": [}',  # 2
    '{"answer": ["x"]}',  # 3
    '{"question": "empty", "answer": []}',  # 4
    '{"question": "typed", "answer": [1]}',  # 5
    "",  # 6
    '{"question": "with id", "answer": "Bob", "id": 7}',  # 7: answer not a list
    '{"question": "with id", "answer": ["Bob"], "id": 7}',  # 8
    '["a list"]',  # 9
]


@pytest.mark.parametrize("gz", [False, True])
def test_nq_open_reader(tmp_path, gz):
    path = write(tmp_path / ("nq.jsonl.gz" if gz else "nq.jsonl"), "\n".join(NQ_LINES) + "\n", gz)
    assert detect_format(path) == "nq-open"
    d = read_qa(path)
    assert d.qa.to_pylist() == [
        {"query_id": "nq-1", "question": "who?", "answers": ["Ann", "Anne"], "gold_doc_ids": []},
        {"query_id": "7", "question": "with id", "answers": ["Bob"], "gold_doc_ids": []},
    ]
    assert reasons(d) == [
        (2, "malformed JSON (Expecting value at column 35)"),
        (3, "missing or empty question text"),
        (4, "answer is an empty list"),
        (5, "answer is not a list of strings"),
        (6, "empty line"),
        (7, "answer is not a list of strings"),
        (9, "JSON line is not an object"),
    ]
    assert d.rejects[1]["raw"] == '{"answer": ["x"]}'


def test_nq_open_duplicate_id_and_truncated_gzip(tmp_path):
    lines = '{"question": "a", "answer": ["x"], "id": "d"}\n' * 2000
    data = gzip.compress(lines.encode())
    path = tmp_path / "nq.jsonl.gz"
    path.write_bytes(data[: len(data) - 30])
    d = read_qa(str(path), format="nq-open")
    assert d.qa.num_rows == 1
    assert d.rejects[0]["reason"] == "duplicate id 'd'" and d.rejects[0]["line"] == 2
    last = d.rejects[-1]
    assert last["reason"].startswith("truncated or corrupt gzip after line")
    assert d.qa.num_rows + len(d.rejects) == last["line"]  # every line read is accounted for, plus the loss


def test_file_uri_reads_like_a_path(tmp_path):
    path = write(tmp_path / "nq.jsonl", NQ_LINES[0] + "\n")
    assert read_qa(f"file://{path}").qa.num_rows == 1


# --------------------------------------------------------------------------- DPR
DPR_QA = [
    "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']",  # 1
    'what is "quoted"\t["a", \'b\']',  # 2: csv-quoted question stays as DPR's csv reader reads it
    "no answers column",  # 3
    "bad literal\t['unclosed",  # 4
    "not a list\t'x'",  # 5
    "numbers\t[1, 2]",  # 6
    "\t['x']",  # 7
    "empty list\t[]",  # 8
]


@pytest.mark.parametrize("gz", [False, True])
def test_dpr_qa_reader(tmp_path, gz):
    path = write(tmp_path / ("nq-dev.qa.csv.gz" if gz else "nq-dev.qa.csv"), "\n".join(DPR_QA) + "\n", gz)
    assert detect_format(path) == "dpr-qa"
    d = read_qa(path)
    rows = d.qa.to_pylist()
    assert rows[0] == {
        "query_id": "dpr-1",
        "question": "who got the first nobel prize in physics",
        "answers": ["Wilhelm Conrad Röntgen"],
        "gold_doc_ids": [],
    }
    assert rows[1]["answers"] == ["a", "b"] and len(rows) == 2
    assert reasons(d) == [
        (3, "expected 2 tab-separated columns (question, answers), found 1"),
        (4, "answers are not a Python literal list"),
        (5, "answers is not a list of strings"),
        (6, "answers is not a list of strings"),
        (7, "missing or empty question text"),
        (8, "answers is an empty list"),
    ]


def test_dpr_passages_reader(tmp_path):
    lines = [
        "id\ttext\ttitle",  # 1: the header, skipped
        '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron',  # 2: csv quoting as in psgs_w100
        "2\tjust two",  # 3
        "3\t \tEmpty",  # 4
        "1\tagain\tAaron",  # 5: duplicate id
        "id\ttext\ttitle",  # 6: only line 1 can be the header; here it is a passage with id "id"
        "4 4\ttext\tT",  # 7: whitespace in the id
    ]
    path = write(tmp_path / "psgs_w100.tsv.gz", "\n".join(lines) + "\n", gz=True)
    assert detect_format(path) == "dpr-passages"
    d = read_qa(path)
    assert d.qa.num_rows == 0
    assert d.corpus.to_pylist() == [
        {"doc_id": "1", "title": "Aaron", "text": 'Aaron Aaron ( or ; "Ahärôn") is a prophet'},
        {"doc_id": "id", "title": "title", "text": "text"},
    ]
    assert reasons(d) == [
        (3, "expected 3 tab-separated columns (id, text, title), found 2"),
        (4, "empty passage text"),
        (5, "duplicate passage id '1'"),
        (7, "passage id '4 4' contains whitespace"),
    ]


# --------------------------------------------------------------------------- HotpotQA
def hotpot_items() -> list:
    para_a = ["Alpha Beta", ["Alpha is ", "a letter."]]
    para_b = ["Gamma", ["Gamma rays."]]
    return [
        {
            "_id": "h1",
            "question": "Which?",
            "answer": "Alpha",
            "supporting_facts": [["Alpha Beta", 0], ["Alpha Beta", 1], ["Gamma", 0]],
            "context": [para_a, para_b],
            "type": "bridge",
            "level": "hard",
        },
        {
            "_id": "h2",
            "question": "Again?",
            "answer": "yes",
            "supporting_facts": [["Gamma", 0]],
            "context": [para_b, ["Gamma", ["Other text."]], ["Empty", []]],
            "type": "comparison",
            "level": "easy",
        },
        {"_id": "h1", "question": "dup", "answer": "x", "supporting_facts": [], "context": []},  # 3
        {"_id": "h4", "question": "", "answer": "x", "supporting_facts": [], "context": []},  # 4
        {"_id": "h5", "question": "ctx?", "answer": "x", "supporting_facts": [], "context": [["T", "not list"]]},
        {"_id": "h6", "question": "typed?", "answer": 3, "supporting_facts": [], "context": []},  # 6
        7,  # 7
        {"_id": "h8", "question": "sf?", "answer": "x", "supporting_facts": [["T"]], "context": []},  # 8
        {
            "_id": "h9",
            "question": "no gold in context",
            "answer": "x",
            "supporting_facts": [["Zeta", 0]],
            "context": [],
        },
    ]


@pytest.mark.parametrize("gz", [False, True])
def test_hotpotqa_reader(tmp_path, gz):
    name = "hotpot_dev_distractor_v1.json" + (".gz" if gz else "")
    path = write(tmp_path / name, json.dumps(hotpot_items()), gz)
    assert detect_format(path) == "hotpotqa"
    d = read_qa(path)
    rows = d.qa.to_pylist()
    assert [r["query_id"] for r in rows] == ["h1", "h2", "h9"]
    assert rows[0]["answers"] == ["Alpha"] and rows[0]["gold_doc_ids"] == ["Alpha_Beta", "Gamma"]
    assert rows[1]["gold_doc_ids"] == ["Gamma"]
    assert d.corpus.to_pylist() == [
        {"doc_id": "Alpha_Beta", "title": "Alpha Beta", "text": "Alpha is a letter."},
        {"doc_id": "Gamma", "title": "Gamma", "text": "Gamma rays."},
    ]
    assert d.stats["title_conflicts"] == 1 and d.stats["empty_paragraphs"] == 1
    assert d.stats["gold_not_in_corpus"] == 1  # h9's "Zeta" (fullwiki-like)
    assert reasons(d) == [
        (3, "duplicate _id 'h1'"),
        (4, "missing or empty question text"),
        (5, "context is not a list of [title, [sentences]] pairs"),
        (6, "answer is not a string"),
        (7, "item is not an object"),
        (8, "supporting_facts is not a list of [title, sentence index] pairs"),
    ]


# --------------------------------------------------------------------------- MS MARCO QnA
def marco_doc() -> dict:
    def passages(n: int, selected: int | None) -> list[dict]:
        return [
            {"is_selected": int(i == selected), "passage_text": f"passage {i}", "url": f"http://x/{i}"}
            for i in range(n)
        ]

    return {
        "query": {"0": "what is x", "1": "no answer here", "2": "", "3": "typed", "4": "dup"},
        "query_id": {"0": 1001, "1": 1002, "2": 1003, "3": 1004, "4": 1001, "5": 1006},
        "answers": {
            "0": ["X is a letter.", "A letter."],
            "1": ["No Answer Present."],
            "2": ["y"],
            "3": "not a list",
            "4": ["z"],
            "5": ["orphan"],
        },
        "wellFormedAnswers": {"0": ["X is a letter of the alphabet."], "1": "[]", "2": "[]", "3": "[]", "4": "[]"},
        "passages": {
            "0": passages(3, 1),
            "1": [*passages(2, None), {"is_selected": 0, "passage_text": " ", "url": ""}],
            "2": passages(1, 0),
            "3": passages(1, 0),
            "4": passages(1, 0),
        },
        "query_type": {"0": "DESCRIPTION", "1": "ENTITY", "2": "x", "3": "x", "4": "x"},
    }


@pytest.mark.parametrize("gz", [False, True])
def test_msmarco_qna_reader(tmp_path, gz):
    path = write(tmp_path / ("dev_v2.1.json.gz" if gz else "dev_v2.1.json"), json.dumps(marco_doc()), gz)
    assert detect_format(path) == "msmarco-qna"
    d = read_qa(path)
    assert d.qa.to_pylist() == [
        {
            "query_id": "1001",
            "question": "what is x",
            "answers": ["X is a letter.", "A letter."],
            "gold_doc_ids": ["1001-1"],
        },
        {"query_id": "1002", "question": "no answer here", "answers": [], "gold_doc_ids": []},
    ]
    assert d.corpus.column("doc_id").to_pylist() == ["1001-0", "1001-1", "1001-2", "1002-0", "1002-1"]
    assert d.corpus.column("text").to_pylist()[1] == "passage 1"
    assert d.extra["well_formed"] == {"1001": ["X is a letter of the alphabet."]}
    assert d.stats["no_answer"] == 1 and d.stats["empty_passages"] == 1 and d.stats["well_formed"] == 1
    assert reasons(d) == [
        (3, "missing or empty question text"),
        (4, "answers is not a list of strings"),
        (5, "duplicate query_id '1001'"),
        (6, "row '5' has no query"),
    ]


# --------------------------------------------------------------------------- detection
def test_unknown_format_is_one_line(tmp_path):
    for name, text in [("x.txt", "hello world\n"), ("y.json", '{"rows": []}'), ("z.tsv", "a\tb\tc\n")]:
        path = write(tmp_path / name, text)
        with pytest.raises(QADataError) as e:
            read_qa(path)
        assert str(e.value).startswith(f"{path}: unrecognised QA format; expected SQuAD")
        assert "\n" not in str(e.value)
    with pytest.raises(QADataError, match="unknown QA format 'csv'"):
        read_qa(path, format="csv")
    with pytest.raises(QADataError, match="cannot open"):
        read_qa(str(tmp_path / "missing.json"))


def test_detection_ignores_the_name(tmp_path):
    # gzip is recognised by its bytes, the format by the content: a misnamed file still reads.
    path = write(tmp_path / "data.bin", "\n".join(NQ_LINES[:1]), gz=True)
    assert detect_format(path) == "nq-open"
    pretty = write(tmp_path / "squad-pretty.txt", json.dumps(squad_doc("2.0"), indent=2))
    assert detect_format(pretty) == "squad"


def test_question_ids_with_whitespace_are_rejects(tmp_path):
    """Query ids go into TREC runs and qrels, which split on whitespace: such an id is a reject, named."""
    lines = ['{"id": "a b", "question": "q?", "answer": ["x"]}', '{"id": "c", "question": "q?", "answer": ["y"]}']
    d = read_qa(write(tmp_path / "nq.jsonl", "\n".join(lines) + "\n"))
    assert reasons(d) == [(1, "id 'a b' contains whitespace")]
    assert d.qa.column("query_id").to_pylist() == ["c"]
