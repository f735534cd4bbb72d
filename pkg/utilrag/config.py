"""Typed configuration: one pydantic schema per stage, one for the pipeline.

A config is a YAML file plus torchtune-style ``key.sub=value`` overrides. Every
mistake (unknown key, wrong type, missing file) becomes one ``ConfigError`` line
naming the key or path; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from utilrag.errors import UtilragError


class ConfigError(UtilragError):
    """A user mistake in a config file or override (printed as one line, exit 2)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- stages
class RayConfig(Strict):
    address: str | None = None  # None: $RAY_ADDRESS if set, else start a local cluster
    num_cpus: int | None = Field(None, ge=1)  # only for a local cluster started here


class DatasetConfig(Strict):
    name: str  # a registered name (scifact, trec-dl-2019, msmarco-passage, BEIR names) or a label
    path: str | None = None  # a local folder or s3:// / gs:// URI holding the layout; None: data_root/name
    layout: Literal["auto", "beir", "msmarco", "tevatron"] = "auto"
    relevance_threshold: int | None = None  # grade counted relevant; None: the registry's (DL: 2)
    # qrels naming documents outside the corpus: reject them, or keep them (a partial corpus
    # such as the DL19 candidate pool, where judged-but-unretrieved passages still count for nDCG).
    unknown_qrels_docs: Literal["reject", "keep"] | None = None


class IngestConfig(Strict):
    datasets: list[DatasetConfig] = Field(min_length=1)
    reject_threshold: float = Field(0.001, ge=0, le=1)  # fail the ingest above this share of bad rows
    rows_per_file: int = Field(500_000, gt=0)
    batch_rows: int = Field(20_000, gt=0)
    download: bool = True  # fetch a registered dataset's public files when it is missing and online


class PoolsConfig(Strict):
    dataset: str
    split: str  # the qrels split whose queries get pools
    run: str | None = None  # ingested run giving hard negatives; None: BM25 over the corpus
    size: int = Field(31, ge=2)  # the paper: 1 human positive + 30 negatives
    seed: int = 0
    max_queries: int | None = None  # a seeded sample of the split's queries, for small local runs


class BM25Config(Strict):
    dataset: str
    split: str  # queries of this qrels split are searched
    k: int = Field(1000, gt=0)
    k1: float = 0.9
    b: float = 0.4
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
    stemmer: str | None = "english"  # a PyStemmer language, or null
    stopwords: str | None = "en"
    fields: list[Literal["title", "text"]] = ["title", "text"]


class IndexTarget(Strict):
    dataset: str
    split: str | None = None  # queries of this qrels split are searched; None: all judged queries
    rerank: str | None = None  # an ingested run (e.g. DL19's bm25 top-100): score only its candidates
    label: str | None = None  # the run's name; default "dense" (or "dense-rerank-<run>")


class IndexConfig(Strict):
    model: str = "sentence-transformers/all-MiniLM-L6-v2"  # HF folder, hub name, or a packaged model
    # Encoding settings: None = as the model's encoder_spec.json says (a model trained here), else
    # the defaults in parentheses; a value set here overrides both.
    pooling: Literal["cls", "mean", "last"] | None = None  # (mean)
    normalize: bool | None = None  # (true)
    query_prefix: str | None = None  # ("")
    passage_prefix: str | None = None  # ("")
    query_max_len: int | None = Field(None, gt=0)  # (64)
    passage_max_len: int | None = Field(None, gt=0)  # (256)
    batch_size: int = Field(64, gt=0)
    encoders: int = Field(1, ge=1)  # encoding actors (one model replica each); the pool's minimum
    max_encoders: int | None = Field(None, ge=1)  # autoscale the encoder pool up to this many (None: fixed)
    use_gpu: bool = False  # a GPU per encoder and per shard actor, and a FAISS GPU index
    embedding_dtype: Literal["float32", "float16"] = "float32"
    rows_per_file: int = Field(2048, gt=0)  # embedding Parquet part size; shards take whole parts
    shards: int = Field(2, ge=1)
    index_type: Literal["flat", "ivf_flat", "ivf_pq", "hnsw"] = "flat"
    nlist: int = 1024  # IVF lists per shard (shrunk to shard size / 39 for small shards)
    # 64: the smallest nprobe with recall@100 >= 0.95 vs Flat at nlist 1024 (0.962, 4.5x Flat's QPS,
    # 2 FAISS threads, 1,000-query batch) on 100k vectors matched to the real MiniLM SciFact embeddings
    # (all 5,183 as anchors + covariance noise; benchmarks/index_search.py, `ivf_sweep`). nlist 2048 reached
    # 0.948-0.951 at nprobe 64 (7.7-8.5x) over two runs; nprobe 32 at nlist 1024 gives 0.916 (8x).
    nprobe: int = 64
    pq_m: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    # GPU: fp16 storage for flat (useFloat16) and ivf_flat (stored as IVF-SQfp16); ivf_pq: fp16 lookup tables
    gpu_fp16: bool = False
    threads_per_shard: int | None = 1
    cpus_per_shard: float | None = None  # CPUs each shard actor reserves; None: threads_per_shard
    shard_start_timeout_s: float = Field(300, gt=0)  # fail (not hang) when shards cannot be placed
    search_retries: int = Field(0, ge=0)  # restart a dead shard from the saved index and retry
    k: int = Field(1000, gt=0)
    targets: list[IndexTarget] = []

    @field_validator("max_encoders")
    @classmethod
    def _pool_grows(cls, v: int | None, info) -> int | None:
        if v is not None and v < info.data.get("encoders", 1):
            raise ValueError(f"must be >= encoders ({info.data['encoders']}), or null for a fixed pool")
        return v

    @field_validator("index_type")
    @classmethod
    def _buildable(cls, v: str, info) -> str:
        from utilrag.index.shards import ShardError, check_index_type

        try:  # refused here, before any encoding, with the shard builder's own message
            check_index_type(v, bool(info.data.get("use_gpu")))
        except ShardError as e:
            raise ValueError(str(e)) from None
        return v


class RunToEvaluate(Strict):
    dataset: str
    split: str | None = None  # qrels split; None: all of the dataset's qrels
    run: str  # a TREC run file, an ingested run, "bm25s" (the BM25 stage) or a dense run's label
    label: str | None = None


class EvaluateConfig(Strict):
    metrics: list[str] = ["nDCG@10", "MRR@10", "R@100", "R@1000", "MAP"]
    runs: list[RunToEvaluate] = []
    baseline: str | None = None  # label of the run the others (same dataset) are tested against
    permutations: int = Field(10_000, ge=100)  # randomisation test samples


class AnnotateTarget(Strict):
    dataset: str
    split: str  # the pools built for <dataset>-<split>
    max_queries: int | None = Field(None, ge=1)  # a seeded subset of the pools' queries (small local runs)


class AnnotateConfig(Strict):
    """The LLM annotation stage (docs/method.md §1-2): vLLM replicas on a Ray Data actor pool."""

    model: str  # HF folder, hub name, or a packaged model (HuggingFaceTB/SmolLM2-135M-Instruct)
    targets: list[AnnotateTarget] = []
    stages: list[Literal["relsel", "answer", "utilsel", "utilrank", "graded"]] = [
        "relsel",
        "answer",
        "utilsel",
        "utilrank",
    ]
    output_name: str | None = None  # None: output_dir/annotate/<dataset>-<split>; else ...-<output_name>
    window: int = Field(16, ge=2)  # at most m passages per listwise prompt (31 -> 16 + 15)
    passage_words: int = Field(300, ge=1)  # passages are cut to this many words (the cut is recorded)
    human_positive: Literal["random", "inclusion", "exclusion"] = "random"
    utilrank_top_percent: float = Field(10.0, gt=0, le=100)  # UtilRank positives: top k%, rounded down, >= 1
    graded_queries: int | None = Field(None, ge=1)  # the pointwise judge: a seeded subset of queries (31 prompts each)
    graded_threshold: int = Field(2, ge=0, le=3)  # graded label counted positive
    # sampling (default greedy) and constrained decoding (vLLM structured outputs, regex)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    max_tokens: int = Field(256, ge=1)  # selection / ranking / grade outputs
    answer_max_tokens: int = Field(256, ge=1)  # the pseudo-answer
    constrained: bool = False
    # engine
    dtype: str = "auto"
    quantization: str | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(8192, ge=16)
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # skips torch.compile: engine start in seconds (CPU, tests)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    use_gpu: bool = False  # a GPU per engine worker (tp x pp per replica, in a placement group)
    accelerator_type: str | None = None  # Ray accelerator type of the replicas' nodes (e.g. A100-80G)
    cpus_per_replica: float = Field(1.0, gt=0)  # CPU replicas: CPUs Ray reserves per engine
    kv_cache_gib: int = Field(2, ge=1)  # CPU replicas: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    cpu_threads_bind: str | None = None  # CPU replicas: VLLM_CPU_OMP_THREADS_BIND (e.g. "0-1")
    # scale and fault tolerance
    replicas: tuple[int, int] = (1, 1)  # autoscaling range of the actor pool (min, max)
    batch_size: int = Field(16, ge=1)  # requests per actor call; one Parquet part per call
    actor_restarts: int = Field(3, ge=0)  # a crashed replica is restarted and its batch retried
    progress_every_s: float = Field(10.0, gt=0)


class TrainConfig(Strict):
    """The retriever training stage (Ray Train + DeepSpeed; docs/method.md §3-4)."""

    model: str = "sentence-transformers/all-MiniLM-L6-v2"  # HF folder, hub name, or a packaged model
    dataset: str = "scifact"
    split: str = "train"  # qrels split (human labels) and pools (<dataset>-<split>) to train on
    labels: Literal["human", "relsel", "utilsel", "utilrank", "graded"] = "human"
    labels_path: str | None = None  # labels table; None: output_dir/annotate/<dataset>-<split>/labels.parquet
    pooling: Literal["cls", "mean", "last"] = "cls"
    normalize: bool = False
    shared_encoder: bool = True
    temperature: float = Field(1.0, gt=0)
    query_max_len: int = Field(32, gt=0)
    passage_max_len: int = Field(140, gt=0)
    loss: Literal["single", "rand1", "joint", "summarg"] = "summarg"
    group_size: int = Field(16, ge=2)  # m + 1 passages per query
    positives: Literal["all", "one", "rand1"] = "all"  # Pos-all / Pos-one / one sampled per epoch
    human_mix_percent: float | None = Field(None, ge=0, le=100)  # union with human labels of X% of queries
    curriculum_human_percent: float | None = Field(None, ge=0, le=100)  # CL stage 2 on X% human labels
    curriculum_epochs: int = Field(1, ge=1)
    epochs: int = Field(2, ge=1)
    lr: float = Field(3e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = 0.01
    per_device_queries: int = Field(16, ge=1)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    deepspeed_zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 on GPU (when supported), fp32 on CPU
    gradient_checkpointing: bool = False
    checkpoint_every_s: float = Field(600.0, gt=0)  # wall-clock seconds between checkpoints (rank 0's clock)
    checkpoint_every: int | None = Field(None, ge=1)  # also every N steps (None: by wall time only)
    max_failures: int = Field(1, ge=0)
    seed: int = 0
    max_queries: int | None = None  # a seeded subset of the training queries (small local runs)
    max_steps: int | None = None
    name: str = "run"  # output_dir/train/<name>/


class PipelineConfig(Strict):
    data_root: str | None = None  # None: $UTILRAG_DATA_ROOT, ../shared/datasets beside the repo, ~/.cache
    output_dir: str = "outputs/local"
    ray: RayConfig = RayConfig()
    ingest: IngestConfig
    pools: list[PoolsConfig] = []
    bm25: list[BM25Config] = []
    index: IndexConfig = IndexConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    annotate: AnnotateConfig | None = None
    train: TrainConfig = TrainConfig()

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


# --------------------------------------------------------------------------- loading
def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a nested dict/list tree (list items by index)."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted!r}: {where!r} is not an index of a {len(node)}-item list")
            position = int(key)
            if last:
                node[position] = value
            else:
                node = node[position]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i])!r} is not a section")
        if last:
            node[key] = value
        else:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        reason = "unknown key"
    elif first["type"] == "missing":
        reason = "required key is missing"
    else:
        reason = first["msg"]
        if "input" in first and not isinstance(first["input"], (dict, list)):
            reason += f" (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {reason}{more}"


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), schema=PipelineConfig):
    """Read a YAML config, apply ``key=value`` overrides, validate against ``schema``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        apply_override(tree, key.strip(), _parse_value(raw))
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path))) from None


# --------------------------------------------------------------------------- paths
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(configured: str | None) -> Path:
    """Where registered datasets live: config, then $UTILRAG_DATA_ROOT, then the shared
    datasets beside a checkout, then ~/.cache/utilrag/datasets."""
    if configured:
        return Path(os.path.expanduser(configured)).resolve()
    if os.environ.get("UTILRAG_DATA_ROOT"):
        return Path(os.path.expanduser(os.environ["UTILRAG_DATA_ROOT"])).resolve()
    shared = REPO_ROOT.parent / "shared" / "datasets"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "utilrag" / "datasets"


def cache_dir() -> Path:
    path = Path(os.environ.get("UTILRAG_CACHE", Path.home() / ".cache" / "utilrag"))
    path.mkdir(parents=True, exist_ok=True)
    return path
