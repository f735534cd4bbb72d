"""Dense encoding: a Hugging Face encoder with CLS, mean or last-token pooling, run on a Ray Data actor pool
(one model replica per actor; a GPU per actor when configured) and written as Parquet shards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from utilrag.config import IndexConfig
from utilrag.encoder_spec import (
    EncoderSpec,
    ModelError,
    model_reference,
    pool,
    read_spec,
    resolve_model,
    tower_dirs,
)
from utilrag.logs import Progress, get_logger
from utilrag.raycluster import node_selector

log = get_logger("index")
SPEC_FIELDS = set(EncoderSpec.model_fields) & set(IndexConfig.model_fields)  # what index.* may override


class Encoder:
    """Tokenise + forward + pool (+ L2 normalise); the one place embeddings are computed."""

    def __init__(
        self,
        model: str,
        pooling: str = "mean",
        normalize: bool = True,
        max_length: int = 256,
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        path = resolve_model(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            weights = torch.float16 if dtype == "float16" else torch.float32
            self.model = AutoModel.from_pretrained(path, dtype=weights).to(device).eval()
        except OSError as e:
            raise ModelError(f"model {model!r} could not be loaded from {path}: {e}") from None
        self.pooling, self.normalize, self.max_length, self.device = pooling, normalize, max_length, device
        # bf16: fp32 weights under autocast (reductions such as LayerNorm and softmax stay fp32)
        self.autocast = dtype == "bfloat16"
        self.dim = self.model.config.hidden_size

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device, torch.bfloat16, enabled=self.autocast):
            hidden = self.model(**batch).last_hidden_state.float()
            pooled = pool(hidden, batch["attention_mask"], self.pooling)  # the training-time function
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()


class EncodeBatch:
    """Ray Data callable class: holds one Encoder; maps {id, text} batches to {id, embedding}."""

    def __init__(
        self,
        model: str,
        pooling: str,
        normalize: bool,
        max_length: int,
        use_gpu: bool,
        out_dtype: str,
        threads: int | None,
        dtype: str = "float32",
    ):
        self.encoder = Encoder(model, pooling, normalize, max_length, "cuda" if use_gpu else "cpu", dtype, threads)
        self.out_dtype = np.dtype(out_dtype)

    def __call__(self, batch: dict) -> dict:
        vectors = self.encoder(list(batch["text"])).astype(self.out_dtype)
        return {"id": batch["id"], "embedding": list(vectors)}


def default_dtype(use_gpu: bool) -> str:
    """index.precision auto: fp16 on a GPU, fp32 on the CPU."""
    return "float16" if use_gpu else "float32"


def compute_dtype(icfg: IndexConfig) -> str:
    """The encoder's arithmetic (index.precision)."""
    chosen = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(icfg.precision)
    return chosen or default_dtype(icfg.use_gpu)


def resolve_encoder(icfg: IndexConfig) -> tuple[EncoderSpec, str, str]:
    """How to encode with icfg.model: its saved encoder spec (a model trained here), else the
    defaults, with every setting given in the index config on top; and its (query, passage) towers
    as references the encoder actors resolve on their own nodes (a trained model's URI, or a folder)."""
    path = resolve_model(icfg.model)  # local (this node's copy of a URI): read the spec
    saved = read_spec(path) if Path(path).is_dir() else None
    given = {k: v for k, v in icfg.model_dump(include=SPEC_FIELDS).items() if v is not None}
    spec = (saved or EncoderSpec()).model_copy(update=given)
    if not spec.shared and not Path(path, "passage").is_dir():
        raise ModelError(f"model {icfg.model!r}: its encoder spec says separate towers, but {path}/passage is missing")
    query_dir, passage_dir = tower_dirs(model_reference(icfg.model), spec)
    return spec, query_dir, passage_dir


def texts_for(table: pa.Table, id_column: str, prefix: str = "") -> pa.Table:
    """(id, text) to encode: documents as 'title text' (the sentence-transformers BEIR convention)."""
    if "title" in table.column_names:
        titles, texts = table.column("title").to_pylist(), table.column("text").to_pylist()
        joined = [f"{prefix}{t} {x}".strip() if t else f"{prefix}{x}" for t, x in zip(titles, texts)]
    else:
        joined = [prefix + x for x in table.column("text").to_pylist()]
    return pa.table({"id": table.column(id_column), "text": joined})


def encoder_pool(encoders: int, max_encoders: int | None = None):
    """The encoders' actor pool: autoscaling from `encoders` up to `max_encoders` (fixed when None)."""
    import ray

    return ray.data.ActorPoolStrategy(min_size=encoders, max_size=max(encoders, max_encoders or encoders))


def encode_table(
    table: pa.Table,
    out_dir: str,
    *,
    model: str,
    pooling: str,
    normalize: bool,
    max_length: int,
    batch_size: int,
    encoders: int,
    use_gpu: bool,
    out_dtype: str,
    rows_per_file: int,
    what: str,
    max_encoders: int | None = None,
    dtype: str | None = None,
) -> dict:
    """Encode an (id, text) table on a Ray Data actor pool (encoders .. max_encoders actors, autoscaled
    by Ray Data); write Parquet parts of (id, embedding)."""
    import ray

    from utilrag.data.tables import ParquetParts

    t0 = time.time()
    cpus = ray.cluster_resources().get("CPU", 1)
    # CPU threads per encoder sized for the largest pool, so that the pool can grow to it on this cluster.
    threads = None if use_gpu else max(1, int(cpus // max(encoders, max_encoders or 1)))
    # Longest texts first: batches of similar length waste less padding.
    order = np.argsort([-len(t) for t in table.column("text").to_pylist()], kind="stable")
    ordered = table.take(pa.array(order))
    step = batch_size * 4  # many small blocks: progress streams back, and several encoders share the work
    ds: Any = ray.data.from_arrow([ordered.slice(i, step) for i in range(0, ordered.num_rows, step)])
    ds = ds.map_batches(
        EncodeBatch,
        batch_size=batch_size,
        compute=encoder_pool(encoders, max_encoders),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else threads,
        **({"label_selector": node_selector(use_gpu)} if node_selector(use_gpu) else {}),
        batch_format="numpy",
        fn_constructor_kwargs=dict(
            model=model,
            pooling=pooling,
            normalize=normalize,
            max_length=max_length,
            use_gpu=use_gpu,
            out_dtype=out_dtype,
            threads=threads,
            dtype=dtype or default_dtype(use_gpu),
        ),
    )
    writer, dim, done = None, None, 0
    progress = Progress(log, f"encoding {what}", table.num_rows, unit="texts")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        vectors = np.stack(list(batch["embedding"]))
        if writer is None:
            dim = vectors.shape[1]
            value = pa.float16() if out_dtype == "float16" else pa.float32()
            schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(value, dim))])
            writer = ParquetParts(out_dir, schema, rows_per_file)
        flat = pa.array(vectors.reshape(-1), type=writer.schema.field("embedding").type.value_type)
        writer.write(
            pa.table(
                {"id": pa.array(batch["id"], pa.string()), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
            )
        )
        done += len(vectors)
        progress.update(len(vectors))
    progress.__exit__(None, None, None)
    if writer is None:
        raise ModelError(f"{what}: nothing to encode (empty table)")
    writer.close()
    return {
        "rows": done,
        "dim": dim,
        "seconds": round(time.time() - t0, 2),
        "per_second": round(done / max(time.time() - t0, 1e-9), 1),
    }


def read_embeddings(folder: str) -> tuple[list[str], np.ndarray]:
    from utilrag.data.tables import read_table

    table = read_table(folder)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return table.column("id").to_pylist(), column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
