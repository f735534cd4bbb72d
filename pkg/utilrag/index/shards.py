"""A FAISS index split over Ray actors: each actor owns one shard (built from its share of the
embedding files, saved with its id map); a search fans the query batch out to every shard and
merges the per-shard top-k into the global top-k. A dead shard fails the search (or is retried
per config) — never a silently partial result.

A shard is built streaming: embedding files are read one at a time (IVF types first train on a
seeded sample drawn in a first pass, then add file by file), so a build's peak host memory is about
the index + one file + the training sample. With use_gpu the empty (untrained) index is cloned to
the GPU first, so IVF training and adding run there."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np

from utilrag.config import HNSW_ON_GPU
from utilrag.errors import UtilragError
from utilrag.logs import get_logger
from utilrag.raycluster import node_selector

INDEX_TYPES = ("flat", "ivf_flat", "ivf_pq", "hnsw")
MIN_POINTS_PER_LIST = 39  # FAISS k-means warns below this many training points per centroid
MAX_POINTS_PER_LIST = 256  # ... and subsamples above this many (its max_points_per_centroid)
PQ_TRAIN_POINTS = 256 * 256  # 8-bit PQ: 256 centroids per sub-quantizer, FAISS uses <= 256 points each
GPU_MAX_K = 2048  # FAISS GPU k-selection limit (k and nprobe)
READ_BATCH_ROWS = 4096  # embedding rows decoded at a time

log = get_logger("index")


class ShardError(UtilragError):
    """An index that cannot be built, loaded or searched correctly (printed as one message, exit 2)."""


class ShardDied(ShardError):
    """A shard actor died during a call."""


def check_index_type(kind: str, use_gpu: bool) -> None:
    """Refuse, before any work, an index type this setup cannot build."""
    if kind not in INDEX_TYPES:
        raise ShardError(f"unknown index type {kind!r} (one of {', '.join(INDEX_TYPES)})")
    if use_gpu and kind == "hnsw":
        raise ShardError(HNSW_ON_GPU)


def ivf_lists(nlist: int, n_vectors: int) -> int:
    """IVF lists actually used: nlist, shrunk so that every list gets >= 39 training points."""
    return max(1, min(nlist, n_vectors // MIN_POINTS_PER_LIST))


def training_sample_size(kind: str, n_vectors: int, nlist: int) -> int:
    """Vectors an IVF shard trains on: what FAISS would use anyway (<= 256 per list; PQ codebooks
    want up to 65,536), never more than the shard holds; 0 for types that need no training."""
    if not kind.startswith("ivf"):
        return 0
    want = ivf_lists(nlist, n_vectors) * MAX_POINTS_PER_LIST
    if kind == "ivf_pq":
        want = max(want, PQ_TRAIN_POINTS)
    return min(n_vectors, want)


def make_faiss_index(
    kind: str, dim: int, n_vectors: int, nlist: int, pq_m: int, hnsw_m: int, fp16_storage: bool = False
):
    """Inner-product index of the configured type (IVF lists shrunk for small shards). fp16_storage
    turns ivf_flat into IVF-SQfp16 (2 bytes per dimension; FAISS's IVF-Flat has no fp16 storage)."""
    import faiss

    check_index_type(kind, use_gpu=False)
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    lists = ivf_lists(nlist, n_vectors)
    quantizer = faiss.IndexFlatIP(dim)
    index: Any
    if kind == "ivf_flat" and fp16_storage:
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
    elif kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    else:
        if dim % pq_m:
            raise ShardError(f"ivf_pq: pq_m={pq_m} must divide the embedding dimension {dim}")
        if n_vectors < 256:
            raise ShardError(
                f"ivf_pq: a shard of {n_vectors} vectors is too small to train 8-bit PQ codebooks "
                f"(needs >= 256): use fewer shards or index_type flat"
            )
        index = faiss.IndexIVFPQ(quantizer, dim, lists, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    return index  # (the Python wrapper keeps the quantizer alive with the index)


def index_nbytes(
    kind: str, ntotal: int, dim: int, *, nlist: int = 0, pq_m: int = 0, hnsw_m: int = 32, fp16: bool = False
) -> int:
    """Memory of an index from its layout (no copy, no serialisation; host or GPU alike):
    ntotal x code size, + 8-byte ids per IVF entry, + the fixed parts (coarse centroids, PQ codebooks).
    flat: 4*dim (2*dim with fp16 storage); ivf_flat: 4*dim (IVF-SQfp16 when fp16: 2*dim);
    ivf_pq: pq_m; hnsw: the vectors + its graph (2M level-0 links, M/(M-1) upper links, level and
    offset per vector). Within ~0.1% of faiss.serialize_index on CPU."""
    if kind == "flat":
        return ntotal * dim * (2 if fp16 else 4)
    if kind == "hnsw":
        links = 2 * hnsw_m + hnsw_m / max(hnsw_m - 1, 1)
        return int(ntotal * (dim * 4 + 4 + 8 + 4 * links))
    if kind == "ivf_flat":
        code, fixed = dim * (2 if fp16 else 4), 0
    elif kind == "ivf_pq":
        code, fixed = pq_m, 256 * dim * 4
    else:
        raise ShardError(f"unknown index type {kind!r}")
    return ntotal * (code + 8) + nlist * dim * 4 + fixed


def index_layout(index) -> dict:
    """The index_nbytes arguments of a CPU index (built here or read from disk)."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        return {"kind": "hnsw", "hnsw_m": index.hnsw.nb_neighbors(1)}  # type: ignore[attr-defined]
    if isinstance(index, faiss.IndexIVFPQ):
        return {"kind": "ivf_pq", "nlist": index.nlist, "pq_m": index.pq.M}
    if isinstance(index, faiss.IndexIVFScalarQuantizer):  # ivf_flat stored as SQfp16 (gpu_fp16)
        return {"kind": "ivf_flat", "nlist": index.nlist, "fp16": index.code_size == 2 * index.d}
    if isinstance(index, faiss.IndexIVFFlat):
        return {"kind": "ivf_flat", "nlist": index.nlist}
    if isinstance(index, faiss.IndexFlat):
        return {"kind": "flat"}
    raise ShardError(f"unsupported FAISS index class {type(index).__name__}")


def scan_embedding_files(files: list[str], expected_dim: int | None, where: str) -> tuple[list[int], int | None]:
    """Rows per file and the common dimension, from Parquet metadata only (nothing is loaded)."""
    import pyarrow.parquet as pq

    from utilrag import store

    rows, dim = [], None
    for f in files:
        if not store.exists(f):
            raise ShardError(f"{where}: embedding file missing: {f}")
        fs, path = store.filesystem(f)
        with fs.open_input_file(path) as handle:
            metadata = pq.read_metadata(handle)
        kind = metadata.schema.to_arrow_schema().field("embedding").type
        d = getattr(kind, "list_size", None)
        if d is None:
            raise ShardError(f"{where}: {f}: the embedding column is {kind}, not a fixed-size list")
        if expected_dim is not None and d != expected_dim:
            raise ShardError(f"{where}: embeddings have dimension {d}, expected {expected_dim} ({f})")
        if dim is not None and d != dim:
            raise ShardError(f"{where}: embeddings have dimension {d} in {f} but {dim} in {files[0]}")
        rows.append(metadata.num_rows)
        dim = d
    return rows, dim


class FaissShard:
    """One shard: a FAISS index over part of the corpus plus its row -> doc id map."""

    def __init__(self, shard_id: int, threads: int | None = None, use_gpu: bool = False, gpu_fp16: bool = False):
        import faiss

        self.shard_id, self.use_gpu, self.gpu_fp16 = shard_id, use_gpu, gpu_fp16
        if threads:
            faiss.omp_set_num_threads(threads)
        self.index: Any = None  # a FAISS index (CPU or GPU) or a TorchFlatIndex
        self.ids: list[str] = []
        self.dim = 0
        self.layout: dict[str, Any] = {}

    def _read(self, path: str, rows: int) -> tuple[list[str], np.ndarray]:
        """One embedding file as (ids, float32 matrix), decoded in record batches straight into the
        matrix: decoding a whole nested-list column at once costs ~6x the file's size, this ~2.5x."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from utilrag import store

        ids: list[str] = []
        vectors, filled = np.empty((rows, self.dim), dtype=np.float32), 0
        fs, local = store.filesystem(path)
        source = local if not store.is_remote(path) else fs.open_input_file(local)
        with pq.ParquetFile(source, memory_map=not store.is_remote(path), pre_buffer=False) as reader:
            for batch in reader.iter_batches(
                batch_size=READ_BATCH_ROWS, columns=["id", "embedding"], use_threads=False
            ):
                column = batch.column("embedding")
                if column.type.list_size != self.dim or filled + len(batch) > rows:
                    raise ShardError(f"shard {self.shard_id}: {path} changed while the shard was built")
                flat = column.flatten().to_numpy(zero_copy_only=False)
                vectors[filled : filled + len(batch)] = flat.reshape(-1, self.dim)
                ids += batch.column("id").to_pylist()
                filled += len(batch)
        if filled != rows:
            raise ShardError(f"shard {self.shard_id}: {path} holds {filled} rows, its metadata says {rows}")
        pa.default_memory_pool().release_unused()
        return ids, vectors

    def build(
        self, files: list[str], kind: str, nlist: int, pq_m: int, hnsw_m: int, expected_dim: int | None, seed: int = 0
    ):
        """Read the files one at a time: IVF types train on a seeded sample drawn in a first pass, then
        every type adds file by file (ids in the same order). Peak host memory ~ index + one file +
        training sample, instead of several copies of the whole shard."""
        check_index_type(kind, self.use_gpu)
        rows, dim = scan_embedding_files(files, expected_dim, f"shard {self.shard_id}")
        total = sum(rows)
        if not total:
            raise ShardError(f"shard {self.shard_id}: no embeddings in {files}")
        self.dim = int(dim or 0)
        fp16 = self.use_gpu and self.gpu_fp16
        cpu_index = make_faiss_index(
            kind, self.dim, total, nlist, pq_m, hnsw_m, fp16_storage=fp16 and kind == "ivf_flat"
        )
        self.layout = self._layout_of(cpu_index)
        index = self._maybe_to_gpu(cpu_index)  # still empty: with a GPU, training and adding run there
        del cpu_index
        if not index.is_trained:
            size = training_sample_size(kind, total, nlist)
            rng = np.random.default_rng([seed, self.shard_id])
            picked = np.sort(rng.choice(total, size=size, replace=False))
            sample, filled, start = np.empty((size, self.dim), dtype=np.float32), 0, 0
            for f, n in zip(files, rows):
                lo, hi = np.searchsorted(picked, [start, start + n])
                if hi > lo:
                    sample[filled : filled + hi - lo] = self._read(f, n)[1][picked[lo:hi] - start]
                    filled += hi - lo
                start += n
            index.train(sample)
            del sample, picked
        ids: list[str] = []
        for f, n in zip(files, rows):
            if n:
                file_ids, vectors = self._read(f, n)
                index.add(vectors)
                ids += file_ids
                del vectors
        if index.ntotal != len(ids):
            raise ShardError(f"shard {self.shard_id}: the index holds {index.ntotal} vectors but the id map {len(ids)}")
        self.index, self.ids = index, ids
        return {"shard": self.shard_id, "vectors": len(ids), "dim": self.dim, "bytes": self.memory_bytes()}

    def _layout_of(self, cpu_index) -> dict:
        layout = index_layout(cpu_index)
        if layout["kind"] == "flat":
            layout["fp16"] = self.use_gpu and self.gpu_fp16  # GpuIndexFlat with useFloat16
        return layout

    def _maybe_to_gpu(self, index):
        """The CPU index cloned to GPU 0 (an empty or untrained one too). gpu_fp16: flat stores fp16
        (useFloat16), ivf_pq uses fp16 lookup tables (the same option); ivf_flat is already IVF-SQfp16."""
        import faiss

        if not self.use_gpu:
            return index
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return self._torch_fallback(index)
        if getattr(self, "_resources", None) is None:
            self._resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = self.gpu_fp16
        try:
            return faiss.index_cpu_to_gpu(self._resources, 0, index, options)
        except RuntimeError as e:
            raise ShardError(
                f"shard {self.shard_id}: FAISS cannot put this {type(index).__name__} on the GPU: "
                f"{str(e).strip().splitlines()[-1]}"
            ) from None

    def _torch_fallback(self, index):
        """No faiss-gpu (the pip faiss-cpu build): exact search with torch on the GPU for flat shards."""
        import faiss

        from utilrag.index.torch_flat import TorchFlatIndex, torch_sees_a_gpu

        torch_gpu = torch_sees_a_gpu()
        if not isinstance(index, faiss.IndexFlat) or not torch_gpu:
            raise ShardError(
                f"shard {self.shard_id}: use_gpu is set but this FAISS build sees no GPU"
                + ("" if torch_gpu else " (nor does torch)")
                + ": install faiss-gpu, or use index_type flat (searched with torch on the GPU)"
            )
        gpu = TorchFlatIndex(index.d, device="cuda", fp16=self.gpu_fp16)
        if index.ntotal:
            gpu.add(index.reconstruct_n(0, index.ntotal))
        return gpu

    def memory_bytes(self) -> int:
        """Index memory from ntotal x code size (host or GPU alike; nothing is copied or serialised)."""
        return int(index_nbytes(ntotal=int(self.index.ntotal), dim=self.dim, **self.layout))

    def set_search_params(self, nprobe: int, ef_search: int) -> None:
        import faiss

        if self.use_gpu and nprobe > GPU_MAX_K and hasattr(self.index, "nprobe"):
            raise ShardError(f"shard {self.shard_id}: nprobe {nprobe} > {GPU_MAX_K}, the FAISS GPU limit")
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = nprobe
        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None) if not self.use_gpu else None
        if hnsw is not None:
            hnsw.efSearch = ef_search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if queries.shape[1] != self.dim:
            raise ShardError(f"shard {self.shard_id}: query dimension {queries.shape[1]} != index dimension {self.dim}")
        k = min(k, len(self.ids))
        if self.use_gpu and k > GPU_MAX_K and not hasattr(self.index, "to_faiss"):  # FAISS GPU only
            raise ShardError(
                f"shard {self.shard_id}: k={k} > {GPU_MAX_K}, the most a FAISS GPU index returns: lower index.k"
            )
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows

    def save(self, folder: str) -> str:
        """Write the shard's index and id map to a folder or URI (each file one write, from this actor:
        on a cluster the actor's node writes straight to shared or object storage)."""
        import faiss

        from utilrag import store

        if hasattr(self.index, "to_faiss"):  # the torch fallback
            index = self.index.to_faiss()
        else:
            index = faiss.index_gpu_to_cpu(self.index) if self.use_gpu else self.index
        fs, path = store.filesystem(folder)
        target = posixpath.join(path, f"shard-{self.shard_id:03d}.faiss")
        if not store.is_remote(folder):
            fs.create_dir(path, recursive=True)
            faiss.write_index(index, target)  # streamed to the file: no copy of the index in memory
        else:
            with fs.open_output_stream(target) as f:  # streamed through the upload
                faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))  # type: ignore[attr-defined]
        with fs.open_output_stream(posixpath.join(path, f"shard-{self.shard_id:03d}.ids.json")) as f:
            f.write(json.dumps(self.ids).encode())
        return folder

    def load(self, folder: str) -> dict:
        import faiss
        import pyarrow.fs as pafs

        from utilrag import store

        fs, root = store.filesystem(folder)
        path = posixpath.join(root, f"shard-{self.shard_id:03d}.faiss")
        ids_path = posixpath.join(root, f"shard-{self.shard_id:03d}.ids.json")
        for p in (path, ids_path):
            if fs.get_file_info(p).type != pafs.FileType.File:
                raise ShardError(f"shard {self.shard_id}: missing shard file {p}")
        if not store.is_remote(folder):
            index = faiss.read_index(path)
        else:
            with fs.open_input_stream(path) as f:
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))  # type: ignore[attr-defined]
        with fs.open_input_file(ids_path) as f:
            self.ids = json.loads(f.read())
        if index.ntotal != len(self.ids):
            raise ShardError(
                f"shard {self.shard_id}: {path} holds {index.ntotal} vectors but its id map {len(self.ids)}"
            )
        self.layout = self._layout_of(index)
        check_index_type(self.layout["kind"], self.use_gpu)
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

    def __init__(
        self,
        n_shards: int,
        threads_per_shard: int | None = None,
        use_gpu: bool = False,
        gpu_fp16: bool = False,
        retries: int = 0,
        cpus_per_shard: float | None = None,
        start_timeout_s: float = 300.0,
        index_type: str | None = None,
    ):
        import ray

        if index_type is not None:  # refuse an impossible index before any actor starts
            check_index_type(index_type, use_gpu)
        self.use_gpu = use_gpu
        cpus = 0 if use_gpu else (cpus_per_shard if cpus_per_shard is not None else (threads_per_shard or 1))
        placement = {"label_selector": node_selector(use_gpu)} if node_selector(use_gpu) else {}
        self._actor_cls: Any = ray.remote(FaissShard).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0, **placement)
        self._actor_args = (threads_per_shard, use_gpu, gpu_fp16)
        self.actors: list[Any] = [self._actor_cls.remote(i, *self._actor_args) for i in range(n_shards)]
        self.retries = retries
        self.ids: list[list[str]] = []
        self.saved_to: str | None = None
        self.stats: list[dict] = []
        # Fail, rather than hang, when the cluster cannot place every shard.
        ready, pending = ray.wait(
            [a.id_map.remote() for a in self.actors], num_returns=n_shards, timeout=start_timeout_s
        )
        if pending:
            self.close()
            raise ShardError(
                f"only {len(ready)} of {n_shards} shard actors could start within {start_timeout_s:.0f}s "
                f"(each asks for {cpus} CPU, {1 if use_gpu else 0} GPU; cluster has "
                f"{ray.cluster_resources().get('CPU', 0):.0f} CPU): lower index.shards or "
                f"index.cpus_per_shard, or add nodes"
            )

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

    def build(
        self,
        files: list[str],
        kind: str = "flat",
        nlist: int = 256,
        pq_m: int = 16,
        hnsw_m: int = 32,
        expected_dim: int | None = None,
    ) -> list[dict]:
        check_index_type(kind, self.use_gpu)
        if not files:
            raise ShardError("no embedding files to index (empty corpus?)")
        if len(files) < len(self.actors):
            raise ShardError(
                f"{len(self.actors)} shards but only {len(files)} embedding file(s): lower "
                f"index.shards or write smaller parts (index.rows_per_file)"
            )
        groups = [files[i :: len(self.actors)] for i in range(len(self.actors))]
        self.stats = self._get(
            [a.build.remote(g, kind, nlist, pq_m, hnsw_m, expected_dim) for a, g in zip(self.actors, groups)], "build"
        )
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
                log.info(f"shard {i} died; restarted from {self.saved_to}")

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
