"""Exact inner-product top-k on a GPU with plain PyTorch: the shard index when faiss-gpu is absent
(the pip faiss-cpu build, or a CUDA version faiss-gpu has no wheel for). Same results as a FAISS
``IndexFlatIP``: scores descending, ``-1`` rows where a shard holds fewer than k vectors."""

from __future__ import annotations

import numpy as np


def torch_sees_a_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TorchFlatIndex:
    """Vectors stored on the device (fp32, or fp16 to halve memory); search in query chunks so
    that the score matrix stays bounded (chunk x ntotal)."""

    def __init__(self, dim: int, device: str = "cuda", fp16: bool = False, chunk_bytes: int = 2 << 30):
        import torch

        self.d, self.device, self.chunk_bytes = dim, device, chunk_bytes
        self.dtype = torch.float16 if fp16 else torch.float32
        self._parts: list = []
        self._matrix = None
        self.is_trained = True

    @property
    def ntotal(self) -> int:
        return sum(int(p.shape[0]) for p in self._parts)

    def add(self, vectors: np.ndarray) -> None:
        import torch

        if vectors.shape[1] != self.d:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, index {self.d}")
        host = torch.as_tensor(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.dtype)  # cast before upload
        self._parts.append(host.to(self.device))
        self._matrix = None

    def _all(self):
        import torch

        if self._matrix is None:
            self._matrix = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts = [self._matrix]
        return self._matrix

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        matrix = self._all()
        n = matrix.shape[0]
        k_eff = min(k, n)
        rows = max(1, self.chunk_bytes // max(1, 4 * n))
        scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids_out = np.full((len(queries), k), -1, dtype=np.int64)
        q_all = torch.as_tensor(np.ascontiguousarray(queries, dtype=np.float32), device=self.device)
        with torch.inference_mode():
            for start in range(0, len(queries), rows):
                q = q_all[start : start + rows]
                if self.dtype == torch.float32:
                    scores = q @ matrix.T
                else:  # fp16 storage, fp32 scores (fp16 outputs keep ~3 digits: top-k order among close scores)
                    scores = torch.cat([q @ part.float().T for part in matrix.split(1 << 18)], dim=1)
                top = torch.topk(scores, k_eff, dim=1)
                scores_out[start : start + rows, :k_eff] = top.values.cpu().numpy()
                ids_out[start : start + rows, :k_eff] = top.indices.cpu().numpy()
        return scores_out, ids_out

    def memory_bytes(self) -> int:
        return self.ntotal * self.d * self.dtype.itemsize

    def to_faiss(self):
        """A faiss-cpu IndexFlatIP holding the same vectors (what a saved shard is on disk)."""
        import faiss

        index = faiss.IndexFlatIP(self.d)
        if self.ntotal:
            index.add(self._all().float().cpu().numpy())
        return index
