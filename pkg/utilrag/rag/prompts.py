"""The generator's prompt. The paper generates RAG answers greedily "with the pseudo-answer prompt
wording" (docs/method.md §5): the annotation stage's answer prompt, quoted there exactly, with the
retrieved passages as its information. Closed-book (no passages) keeps the same turns and drops the
information sentence. Bump the version when a wording changes: it is part of the fingerprint."""

from __future__ import annotations

from utilrag.annotate.prompts import answer_messages

RAG_PROMPT_VERSION = "rag-1"


def generator_messages(question: str, passages: list[str]) -> list[dict]:
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
