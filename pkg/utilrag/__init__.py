"""utilrag: LLM utility annotation -> retriever training -> retrieval and RAG evaluation, on Ray."""

__version__ = "0.1.0"
