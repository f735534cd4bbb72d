"""A FAISS index split over Ray actors: each actor owns one shard (built from its share of the
embedding files, saved with its id map); a search fans the query batch out to every shard and
merges the per-shard top-k into the global top-k. A dead shard fails the search (or is retried
per config) — never a silently partial result."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class ShardError(Exception):
    """An index that cannot be built, loaded or searched correctly (printed as one message, exit 2)."""


class ShardDied(ShardError):
    """A shard actor died during a call."""


def make_faiss_index(kind: str, dim: int, n_vectors: int, nlist: int, pq_m: int, hnsw_m: int):
    """Inner-product index of the configured type (IVF lists shrunk for small shards)."""
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    lists = max(1, min(nlist, n_vectors // 39))  # FAISS wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf_flat":
        return faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf_pq":
        if dim % pq_m:
            raise ShardError(f"ivf_pq: pq_m={pq_m} must divide the embedding dimension {dim}")
        return faiss.IndexIVFPQ(quantizer, dim, lists, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    raise ShardError(f"unknown index type {kind!r}")


class FaissShard:
    """One shard: a FAISS index over part of the corpus plus its row -> doc id map."""

    def __init__(self, shard_id: int, threads: int | None = None, use_gpu: bool = False, gpu_fp16: bool = False):
        import faiss

        self.shard_id, self.use_gpu, self.gpu_fp16 = shard_id, use_gpu, gpu_fp16
        if threads:
            faiss.omp_set_num_threads(threads)
        self.index, self.ids, self.dim = None, [], None

    def build(self, files: list[str], kind: str, nlist: int, pq_m: int, hnsw_m: int, expected_dim: int | None):
        from utilrag.index.encode import read_embeddings

        ids, vectors = [], []
        for f in files:
            if not Path(f).is_file():
                raise ShardError(f"shard {self.shard_id}: embedding file missing: {f}")
            i, v = read_embeddings(Path(f))
            ids += i
            vectors.append(v)
        matrix = np.ascontiguousarray(np.concatenate(vectors).astype(np.float32)) if vectors else None
        if matrix is None or not len(matrix):
            raise ShardError(f"shard {self.shard_id}: no embeddings in {files}")
        if expected_dim is not None and matrix.shape[1] != expected_dim:
            raise ShardError(f"shard {self.shard_id}: embeddings have dimension {matrix.shape[1]}, "
                              f"expected {expected_dim} ({files[0]})")
        self.dim = matrix.shape[1]
        index = make_faiss_index(kind, self.dim, len(matrix), nlist, pq_m, hnsw_m)
        if not index.is_trained:
            index.train(matrix)
        index.add(matrix)
        self.index, self.ids = self._maybe_to_gpu(index), ids
        return {"shard": self.shard_id, "vectors": len(ids), "dim": self.dim, "bytes": self.memory_bytes()}

    def _maybe_to_gpu(self, index):
        import faiss

        if not self.use_gpu:
            return index
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            raise ShardError(f"shard {self.shard_id}: use_gpu is set but this FAISS build sees no GPU")
        self._resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = self.gpu_fp16
        return faiss.index_cpu_to_gpu(self._resources, 0, index, options)

    def memory_bytes(self) -> int:
        import faiss

        index = faiss.index_gpu_to_cpu(self.index) if self.use_gpu else self.index
        return int(faiss.serialize_index(index).nbytes)

    def set_search_params(self, nprobe: int, ef_search: int) -> None:
        import faiss

        if hasattr(self.index, "nprobe"):
            self.index.nprobe = nprobe
        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None) if not self.use_gpu else None
        if hnsw is not None:
            hnsw.efSearch = ef_search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if queries.shape[1] != self.dim:
            raise ShardError(f"shard {self.shard_id}: query dimension {queries.shape[1]} != index dimension {self.dim}")
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.ids)))
        return scores, rows

    def save(self, folder: str) -> str:
        import faiss

        folder_path = Path(folder)
        folder_path.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index) if self.use_gpu else self.index
        faiss.write_index(index, str(folder_path / f"shard-{self.shard_id:03d}.faiss"))
        (folder_path / f"shard-{self.shard_id:03d}.ids.json").write_text(json.dumps(self.ids))
        return str(folder_path)

    def load(self, folder: str) -> dict:
        import faiss

        path = Path(folder) / f"shard-{self.shard_id:03d}.faiss"
        ids_path = path.with_suffix("").with_suffix(".ids.json")
        if not path.is_file() or not ids_path.is_file():
            raise ShardError(f"shard {self.shard_id}: missing shard file {path if not path.is_file() else ids_path}")
        index = faiss.read_index(str(path))
        self.ids = json.loads(ids_path.read_text())
        if index.ntotal != len(self.ids):
            raise ShardError(f"shard {self.shard_id}: {path} holds {index.ntotal} vectors but its id map {len(self.ids)}")
        self.index, self.dim = self._maybe_to_gpu(index), index.d
        return {"shard": self.shard_id, "vectors": len(self.ids), "dim": self.dim}

    def id_map(self) -> list[str]:
        return self.ids


def merge_topk(per_shard: list[tuple[np.ndarray, np.ndarray, list[str]]], k: int) -> tuple[np.ndarray, list[list[str]]]:
    """Global top-k from per-shard top-k lists (scores descending; -1 rows are FAISS padding)."""
    scores = np.concatenate([s for s, _, _ in per_shard], axis=1)
    doc_ids = np.concatenate([np.asarray(ids, dtype=object)[np.maximum(r, 0)] for _, r, ids in per_shard], axis=1)
    valid = np.concatenate([r >= 0 for _, r, _ in per_shard], axis=1)
    scores = np.where(valid, scores, -np.inf)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    top_ids = [[doc_ids[i, j] for j, s in zip(top[i], top_scores[i]) if np.isfinite(s)] for i in range(len(top))]
    return top_scores, top_ids


class ShardedIndex:
    """Driver-side handle: N Ray actors, each a FaissShard."""

    def __init__(self, n_shards: int, threads_per_shard: int | None = None, use_gpu: bool = False,
                 gpu_fp16: bool = False, retries: int = 0, cpus_per_shard: float | None = None,
                 start_timeout_s: float = 300.0):
        import ray

        cpus = 0 if use_gpu else (cpus_per_shard if cpus_per_shard is not None else (threads_per_shard or 1))
        self._actor_cls = ray.remote(FaissShard).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0)
        self._actor_args = (threads_per_shard, use_gpu, gpu_fp16)
        self.actors = [self._actor_cls.remote(i, *self._actor_args) for i in range(n_shards)]
        self.retries, self.ids, self.saved_to = retries, None, None
        self.stats: list[dict] = []
        # Fail, rather than hang, when the cluster cannot place every shard.
        ready, pending = ray.wait([a.id_map.remote() for a in self.actors], num_returns=n_shards,
                                  timeout=start_timeout_s)
        if pending:
            self.close()
            raise ShardError(f"only {len(ready)} of {n_shards} shard actors could start within {start_timeout_s:.0f}s "
                             f"(each asks for {cpus} CPU, {1 if use_gpu else 0} GPU; cluster has "
                             f"{ray.cluster_resources().get('CPU', 0):.0f} CPU): lower index.shards or "
                             f"index.cpus_per_shard, or add nodes")

    def _get(self, refs, what: str):
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as e:
            raise ShardDied(f"{what}: a shard actor died ({type(e).__name__}); refusing a partial result") from None
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), ShardError):
                raise e.cause from None
            raise

    def build(self, files: list[str], kind: str = "flat", nlist: int = 256, pq_m: int = 16, hnsw_m: int = 32,
              expected_dim: int | None = None) -> list[dict]:
        if not files:
            raise ShardError("no embedding files to index (empty corpus?)")
        if len(files) < len(self.actors):
            raise ShardError(f"{len(self.actors)} shards but only {len(files)} embedding file(s): lower "
                             f"index.shards or write smaller parts (index.rows_per_file)")
        groups = [files[i::len(self.actors)] for i in range(len(self.actors))]
        self.stats = self._get([a.build.remote(g, kind, nlist, pq_m, hnsw_m, expected_dim)
                                for a, g in zip(self.actors, groups)], "build")
        self._check_dims("build")
        self.ids = self._get([a.id_map.remote() for a in self.actors], "id map")
        return self.stats

    def load(self, folder: str) -> list[dict]:
        self.stats = self._get([a.load.remote(folder) for a in self.actors], "load")
        self._check_dims(folder)
        self.ids = self._get([a.id_map.remote() for a in self.actors], "id map")
        self.saved_to = folder
        return self.stats

    def _check_dims(self, where: str) -> None:
        dims = {s["dim"] for s in self.stats}
        if len(dims) > 1:
            raise ShardError(f"{where}: shards disagree on the embedding dimension: {sorted(dims)}")

    def save(self, folder: str) -> None:
        self._get([a.save.remote(folder) for a in self.actors], "save")
        self.saved_to = folder

    def set_search_params(self, nprobe: int = 16, ef_search: int = 128) -> None:
        self._search_params = (nprobe, ef_search)
        self._get([a.set_search_params.remote(nprobe, ef_search) for a in self.actors], "search params")

    def _respawn_dead_shards(self) -> None:
        """Replace dead actors with new ones that reload their shard from the saved index."""
        import ray

        for i, actor in enumerate(self.actors):
            try:
                ray.get(actor.id_map.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(actor)
                self.actors[i] = self._actor_cls.remote(i, *self._actor_args)
                self._get([self.actors[i].load.remote(self.saved_to)], f"reload shard {i}")
                if getattr(self, "_search_params", None):
                    self._get([self.actors[i].set_search_params.remote(*self._search_params)], "search params")
                print(f"[index] shard {i} died; restarted from {self.saved_to}", flush=True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        import ray

        queries_ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
        for attempt in range(self.retries + 1):
            try:
                results = self._get([a.search.remote(queries_ref, k) for a in self.actors], "search")
                break
            except ShardDied:
                if attempt == self.retries or self.saved_to is None:
                    raise
                self._respawn_dead_shards()
        return merge_topk([(s, r, ids) for (s, r), ids in zip(results, self.ids)], k)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
