"""The annotation prompts, as chat messages (one passage per user turn), versioned.

RelSel / pseudo-answer / UtilSel / UtilRank keep the wording of Zhang et al. (EMNLP 2025,
docs/method.md §2) exactly, typos included: a model fine-tuned or evaluated on that wording should
see it unchanged. Changing any text here must bump ``PROMPT_VERSION`` (it is written into every
output row and into the stage fingerprint, so old outputs are not mixed with new ones).
"""

from __future__ import annotations

PROMPT_VERSION = "zhang2025-v1"

# Constrained decoding (vLLM structured outputs): the answer formats the prompts ask for.
SELECTION_REGEX = r"My selection:\[(\[[0-9]{1,2}\](,\[[0-9]{1,2}\])*)?\]\.?"
RANKING_REGEX = r"\[[0-9]{1,2}\]( > \[[0-9]{1,2}\])*"
GRADE_REGEX = r"##final score: [0-3]"
QUESTION_REGEX = r"[^\s?][^\n?]{5,200}\?"  # one line (any script), one question mark at its end


def cut_words(text: str, max_words: int) -> tuple[str, bool]:
    """The first ``max_words`` whitespace-separated words (the reference code cuts at 300)."""
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words), False
    return " ".join(words[:max_words]), True


LAYOUTS = ("paper", "shared_prefix")


def arrange(messages: list[dict], layout: str = "paper") -> list[dict]:
    """A stage's chat in the given layout. ``paper``: as written above. ``shared_prefix``: the same turns,
    the same words, with the passage turns moved to the front, so that prompts showing the same
    passages (UtilSel and UtilRank over a query's RelSel set) share their longest part as a prefix and
    vLLM's prefix cache prefills it once. An option the paper does not have (its labels may differ:
    benchmarks/layout_agreement.py measures by how much)."""
    if layout == "paper":
        return messages
    passages: list[dict] = []
    rest: list[dict] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        n = messages[i + 1] if i + 1 < len(messages) else {"role": "", "content": ""}
        if m["role"] == "user" and m["content"].startswith("[") and n["content"].startswith("Received passage ["):
            passages += [m, n]
            i += 2
        else:
            rest.append(m)
            i += 1
    return passages + rest


def _passage_turns(passages: list[str]) -> list[dict]:
    turns = []
    for rank, passage in enumerate(passages, start=1):
        turns.append({"role": "user", "content": f"[{rank}] {passage}"})
        turns.append({"role": "assistant", "content": f"Received passage [{rank}]."})
    return turns


def relsel_messages(query: str, passages: list[str]) -> list[dict]:
    num = len(passages)
    return [
        {
            "role": "user",
            "content": "You are the relevance judger, an intelligent assistant that can select the "
            "passages that are relevant to the question.",
        },
        {"role": "assistant", "content": "Yes, I am the relevance judger."},
        {
            "role": "user",
            "content": f"I will provide you with {num} passages, each indicated by number identifier "
            f"[]. \nSelect the passages that are relevant to the question: {query}.",
        },
        {"role": "assistant", "content": "Okay, please provide the passages."},
        *_passage_turns(passages),
        {
            "role": "user",
            "content": f"Search Query: {query}. \nDirectly output the passages you selected that are "
            "relevant to the question. The format of the output is: 'My selection:[[i],[j],"
            "...].'. Only response the selection results, do not say any word or explain.",
        },
    ]


def answer_messages(query: str, passages: list[str]) -> list[dict]:
    info = "\n".join(f"[{rank}] {p}" for rank, p in enumerate(passages, start=1))
    return [
        {
            "role": "user",
            "content": "You are a faithful question and answer assistant. Answer the question based on "
            "the given information with one or few sentences without the source.",
        },
        {"role": "assistant", "content": "Yes, i am the faithful question and answer assistant."},
        {
            "role": "user",
            "content": f"Given the information: \n{info}\n Answer the following question based on the "
            "given information with one or few sentences without the source.\n Question: "
            f"{query}\n\n Answer:",
        },
    ]


def utilsel_messages(query: str, passages: list[str], answer: str) -> list[dict]:
    num = len(passages)
    return [
        {
            "role": "user",
            "content": "You are the utility judger, an intelligent assistant that can select the "
            "passages that have utility in answering the question.",
        },
        {"role": "assistant", "content": "Yes, I am the utility judger."},
        {
            "role": "user",
            "content": f"I will provide you with {num} passages, each indicated by number identifier "
            "[]. \n I will also provide you with a reference answer to the question. \nSelect "
            "the passages that have utility in generating the reference answer to the "
            f"following question from the {num} passages: {query}.",
        },
        {"role": "assistant", "content": "Okay, please provide the passages and the reference answer."},
        *_passage_turns(passages),
        {
            "role": "user",
            "content": f"Question: {query}. \n Reference answer: {answer}. \n\n The requirements for "
            "judging whether a passage has utility in answering the question are: The passage "
            "has utility in answering the question, meaning that the passage not only be "
            "relevant to the question, but also be useful in generating a correct, reasonable "
            "and perfect answer to the question. \nDirectly output the passages you selected "
            "that have utility in generating the reference answer to the question. The format "
            "of the output is: 'My selection:[[i],[j],...].'. Only response the selection "
            "results, do not say any word or explain.",
        },
    ]


def utilrank_messages(query: str, passages: list[str], answer: str) -> list[dict]:
    num = len(passages)
    return [
        {
            "role": "user",
            "content": "You are RankGPT, an intelligent assistant that can rank passages based on their "
            "utility in generating the given reference answer to the question.",
        },
        {"role": "assistant", "content": "Yes, i am RankGPT."},
        {
            "role": "user",
            "content": f"I will provide you with {num} passages, each indicated by number identifier [].  "
            "I will also give you a reference answer to the question. \nRank the passages "
            f"based on their utility in generating the reference answer to the question: {query}.",
        },
        {"role": "assistant", "content": "Okay, please provide the passages and the reference answer."},
        *_passage_turns(passages),
        {
            "role": "user",
            "content": f"Question: {query}. \n\n Reference answer: {answer}\n\n Rank the {num} passages "
            "above based on their utility in generating the reference answer to the question. "
            "The passages should be listed in utility descending order using identifiers.  The "
            "passages that have utility generating the reference answer to the question should "
            "be listed first. The output format should be [] > [] > [] > ..., e.g., [i] > [j] > "
            "[k] > ... Only response the ranking results, do not say any word or explain.",
        },
    ]


def graded_messages(query: str, passage: str) -> list[dict]:
    """A pointwise 0-3 judge in the style of UMBRELA (Upadhyay et al., 2024): TREC DL's grade
    definitions, an instruction to weigh intent match and trustworthiness, one final score."""
    return [
        {"role": "system", "content": "You are a search quality rater evaluating the relevance of passages."},
        {
            "role": "user",
            "content": (
                "Given a query and a passage, you must provide a score on an integer scale of 0 to 3 with the "
                "following meanings:\n"
                "0 = the passage has nothing to do with the query.\n"
                "1 = the passage seems related to the query but does not answer it.\n"
                "2 = the passage has some answer for the query, but the answer may be a bit unclear, or hidden amongst "
                "extraneous information.\n"
                "3 = the passage is dedicated to the query and contains the exact answer.\n\n"
                f"Query: {query}\nPassage: {passage}\n\n"
                "Consider the underlying intent of the search, how well the passage matches it, and how "
                "trustworthy the passage is; then decide on a final score. Give the final score only, in the format: "
                "##final score: N"
            ),
        },
    ]


# --------------------------------------------------------------------------- the RAG generator
# The paper generates RAG answers greedily "with the pseudo-answer prompt wording" (docs/method.md §5):
# the answer prompt above, with the retrieved passages as its information. Closed-book (no passages)
# keeps the same turns and drops the information sentence. Its own version: bump it when a wording
# here changes (it is in the RAG stage's fingerprint and rows).
RAG_PROMPT_VERSION = "rag-1"


def rag_messages(question: str, passages: list[str]) -> list[dict]:
    if passages:
        return answer_messages(question, passages)
    return [
        {
            "role": "user",
            "content": "You are a faithful question and answer assistant. Answer the question with one or "
            "few sentences.",
        },
        {"role": "assistant", "content": "Yes, i am the faithful question and answer assistant."},
        {
            "role": "user",
            "content": f"Answer the following question with one or few sentences.\n Question: {question}\n\n Answer:",
        },
    ]


# --------------------------------------------------------------------------- query generation
# The querygen stage's prompt (InPars / Promptagator style: a few (passage, question) examples, then the
# passage), ours. Versioned apart from the paper's prompts: changing it redoes the questions, not the labels.
QUESTION_PROMPT_VERSION = "utilrag-questions-v1"
QUESTION_EXAMPLES = (
    (
        "The kidneys filter about 180 litres of blood plasma a day. Most of the water and salts are taken back "
        "into the blood in the tubules, so only one to two litres leave the body as urine.",
        "how much urine do the kidneys make per day",
    ),
    (
        "Cast iron contains more than 2% carbon, which makes it hard and brittle but easy to pour into moulds. "
        "Wrought iron has almost no carbon and can be bent and hammered without cracking.",
        "why is cast iron more brittle than wrought iron",
    ),
    (
        "The treaty was signed in 1648 in Osnabrück and Münster and ended the Thirty Years' War. It recognised "
        "the sovereignty of the states of the Holy Roman Empire over their own territory.",
        "which treaty ended the thirty years war",
    ),
)


def question_messages(passage: str, variant: int = 0) -> list[dict]:
    """One search question the passage answers. ``variant`` k rotates the examples by k (the
    examples' order is the only difference): the querygen stage's second and third question of a
    passage come from the same wording, primed differently, so greedy decoding can still differ."""
    k = variant % len(QUESTION_EXAMPLES)
    examples = QUESTION_EXAMPLES[k:] + QUESTION_EXAMPLES[:k]
    shots = "\n\n".join(f"Passage: {p}\nQuestion: {q}" for p, q in examples)
    return [
        {
            "role": "user",
            "content": (
                "Write one question that a person might type into a search engine and that the passage "
                "answers. Use the passage's own subject; do not copy a whole sentence. Output the question only, "
                "on one line.\n\n"
                f"{shots}\n\nPassage: {passage}\nQuestion:"
            ),
        }
    ]


def clean_question(raw: str) -> str:
    """The question in a model's answer: its first non-empty line, without a "Question:" label, quotes
    or list marks."""
    import re

    for line in raw.splitlines():
        line = line.strip().strip("\"'`")
        line = re.sub(r"^(?:(?:[-*\u2022]|\d+[.)])\s+)?(?:question\s*\d*\s*:\s*)?", "", line, flags=re.I)
        line = line.strip().strip("\"'`")
        if line:
            return " ".join(line.split())
    return ""
