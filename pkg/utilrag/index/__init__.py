"""Index stage: BM25 (bm25s) now; sharded FAISS indices arrive with their issue."""
from utilrag.index.bm25 import run_bm25

__all__ = ["run_bm25"]
