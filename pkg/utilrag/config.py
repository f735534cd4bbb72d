"""Typed configuration: one pydantic schema per stage, one for the pipeline.

A config is a YAML file plus torchtune-style ``key.sub=value`` overrides. Every
mistake (unknown key, wrong type, missing file) becomes one ``ConfigError`` line
naming the key or path; the CLI turns it into exit code 2. Every key carries a description:
``utilrag.config_reference`` renders them as docs/configuration.md's Markdown table and as JSON Schema.
Where things are on disk (the checkout, the data root, the cache): ``utilrag.paths``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from utilrag import cost
from utilrag.errors import UtilragError


class ConfigError(UtilragError):
    """A user mistake in a config file or override (printed as one line, exit 2)."""


# Datasets evaluated as a group: CQADupStack is 12 StackExchange forums, each retrieved and scored
# on its own, reported as their mean (as BEIR does). A config entry naming the group stands for all.
CQADUPSTACK_FORUMS = (
    "android",
    "english",
    "gaming",
    "gis",
    "mathematica",
    "physics",
    "programmers",
    "stats",
    "tex",
    "unix",
    "webmasters",
    "wordpress",
)
DATASET_GROUPS: dict[str, tuple[str, ...]] = {"cqadupstack": tuple(f"cqadupstack-{f}" for f in CQADUPSTACK_FORUMS)}


# The paper's 14 BEIR sets (Table 2's "BEIR avg": nDCG@10 averaged over them, CQADupStack counted once
# as its forums' mean). BEIR's msmarco is the training collection, so it is not among them.
BEIR_14 = (
    "arguana",
    "climate-fever",
    "cqadupstack",
    "dbpedia-entity",
    "fever",
    "fiqa",
    "hotpotqa",
    "nfcorpus",
    "nq",
    "quora",
    "scidocs",
    "scifact",
    "trec-covid",
    "webis-touche2020",
)


def group_of(dataset: str) -> str | None:
    return next((g for g, members in DATASET_GROUPS.items() if dataset in members), None)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- stages
# One message for the config check and the shard builder's own check.
HNSW_ON_GPU = (
    "index_type hnsw cannot run on the GPU (FAISS has no GPU HNSW): set index.use_gpu=false "
    "for hnsw, or use flat, ivf_flat or ivf_pq on the GPU"
)


class RayConfig(Strict):
    address: str | None = Field(
        None,
        description="Ray cluster address; null: $RAY_ADDRESS if set (as `ray job submit` does), else a local cluster",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a local cluster started here (ignored for an address)"
    )
    node_labels: bool = Field(
        False,
        description="the cluster's node types carry the label utilrag-node: cpu | gpu (every cluster config "
        "here): CPU work (Ray Data tasks, Ray Data's scale-up requests, index shards) asks for cpu nodes and "
        "GPU work (replicas, GPU encoders, GPU training) for gpu nodes, so CPU work never launches a GPU node "
        "(autoscaler v2, which `ray up` and KubeRay run, honours labels). false: no label constraint",
    )


class DatasetConfig(Strict):
    name: str = Field(description="a registered name (scifact, trec-dl-2019, msmarco-passage, BEIR names) or a label")
    path: str | None = Field(
        None, description="a local folder or s3:// / gs:// URI holding the layout; null: <data_root>/<name>"
    )
    layout: Literal["auto", "beir", "msmarco", "tevatron", "qa", "plain"] = Field(
        "auto",
        description="the files' layout (qa: a question-answering file, see the RAG section; plain: your own "
        "corpus, docs/data.md)",
    )
    passage_words: int = Field(
        200, ge=10, description="plain layout: a longer document is cut into passages of this many words"
    )
    passage_overlap: int = Field(50, ge=0, description="plain layout: words a passage shares with the one before")
    max_document_mb: float = Field(
        10.0, gt=0, description="plain layout: a .txt / .md document larger than this is rejected, not read"
    )
    relevance_threshold: int | None = Field(
        None, description="qrels grade counted relevant; null: the registry's (TREC DL: 2)"
    )
    # qrels naming documents outside the corpus: reject them, or keep them (a partial corpus
    # such as the DL19 candidate pool, where judged-but-unretrieved passages still count for nDCG).
    unknown_qrels_docs: Literal["reject", "keep"] | None = Field(
        None,
        description="qrels naming documents outside the corpus: reject them, or keep them (a partial corpus "
        "such as the DL19 candidate pool, where judged-but-unretrieved passages still count for nDCG); "
        "null: the registry's",
    )
    ignore_identical_ids: bool | None = Field(
        None,
        description="evaluation drops a retrieved document whose id is the query's (BEIR does this for ArguAna "
        "and Quora, whose queries are corpus documents); null: the registry's",
    )
    titles: bool | None = Field(
        None,
        description="keep passage titles (encoded as 'title text'); false: text alone. null: the registry's "
        "(tevatron-msmarco: false, as the 8.8M MS MARCO collection the retriever is evaluated on has none), else true",
    )
    qa_test_percent: float | None = Field(
        None,
        gt=0,
        lt=100,
        description="qa layout: also split the questions by their gold passage into qrels splits 'train' and 'test' "
        "(this share of the passages' questions, by a stable hash), so a retriever trained on one split is scored "
        "on questions about other passages; 'dev' keeps them all. null: 'dev' only",
    )
    queries_only: bool = Field(
        False,
        description="ingest queries, qrels and runs but not the passages: they are another dataset's (TREC DL "
        "2019/2020 judge MS MARCO's 8.8M passages), searched by naming that dataset as an index target's corpus; "
        "judged passages are kept unchecked (no corpus here to check them against)",
    )

    @model_validator(mode="after")
    def _qa_split_needs_a_qa_layout(self) -> DatasetConfig:
        if self.qa_test_percent is not None and self.layout not in ("qa", "auto"):
            raise ValueError(f"qa_test_percent splits a QA set's questions; layout {self.layout!r} has none")
        return self

    @model_validator(mode="after")
    def _overlap_below_window(self) -> DatasetConfig:
        if self.passage_overlap >= self.passage_words:
            raise ValueError(f"passage_overlap {self.passage_overlap} must be below passage_words {self.passage_words}")
        return self


class IngestConfig(Strict):
    datasets: list[DatasetConfig] = Field(min_length=1, description="the datasets to ingest")
    reject_threshold: float = Field(0.001, ge=0, le=1, description="fail the ingest above this share of bad rows")
    rows_per_file: int = Field(500_000, gt=0, description="rows per Parquet part of the ingested tables")
    batch_rows: int = Field(20_000, gt=0, description="rows read and validated per batch")
    download: bool = Field(True, description="fetch a registered dataset's public files when it is missing and online")


class PoolsConfig(Strict):
    dataset: str = Field(description="an ingested dataset")
    split: str = Field(description="the qrels split whose queries get pools; 'all': every query (no qrels needed)")
    run: str | None = Field(None, description="an ingested run giving hard negatives; null: BM25 over the corpus")
    size: int = Field(31, ge=2, description="passages per pool (the paper: 1 human positive + 30 negatives)")
    seed: int = Field(0, description="seed of the per-query shuffle and of the max_queries sample")
    max_queries: int | None = Field(
        None, description="a seeded sample of the split's queries, for small local runs; null: all"
    )
    keep_unlabeled: bool | None = Field(
        None,
        description="a query without a human positive gets a pool of the run's top passages (no positive in it) "
        "instead of being dropped; null: only when the dataset has no qrels (your own corpus, split 'all')",
    )
    dense: str | None = Field(
        None,
        description="the label of an index target over this dataset and split with an off-the-shelf encoder "
        "(index.targets; not a train: model): its run joins the candidates, interleaved rank by rank with "
        "BM25's (or run's), each passage once. The pipeline searches it first (stage 'candidates'). null: none",
    )


class BM25Config(Strict):
    dataset: str = Field(description="an ingested dataset; its corpus is indexed")
    split: str = Field(
        description="queries of this qrels split are searched; 'all': every query (a corpus without qrels)"
    )
    corpus: str | None = Field(
        None, description="the ingested dataset whose passages are searched (as index targets' corpus); null: its own"
    )
    k: int = Field(1000, gt=0, description="results per query")
    k1: float = Field(0.9, description="BM25 k1 (term frequency saturation)")
    b: float = Field(0.4, description="BM25 b (length normalisation)")
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = Field(
        "lucene", description="the bm25s scoring variant"
    )
    stemmer: str | None = Field("english", description="a PyStemmer language, or null for no stemming")
    stopwords: str | None = Field("en", description="a bm25s stopword list, or null for none")
    fields: list[Literal["title", "text"]] = Field(["title", "text"], description="document fields indexed")


class IndexTarget(Strict):
    dataset: str = Field(description="an ingested dataset")
    split: str | None = Field(None, description="queries of this qrels split are searched; null: all judged queries")
    rerank: str | None = Field(
        None, description="an ingested run (e.g. DL19's bm25 top-100): score only its candidates; null: full retrieval"
    )
    label: str | None = Field(None, description='the run\'s name; null: "dense" (or "dense-rerank-<run>")')
    k: int | None = Field(None, gt=0, description="results per query of this search; null: index.k")
    model: str | None = Field(
        None,
        description='the encoder of this search; null: index.model. "train:<name>" is the retriever the train '
        "stage fitted as <name> (set for each train setting by index.trained_targets)",
    )
    corpus: str | None = Field(
        None,
        description="the ingested dataset whose passages are searched (encoded once per encoder and shared by "
        "every target naming it: MS MARCO dev, DL19 and DL20 search msmarco-passage); null: the dataset's own",
    )

    def corpus_name(self) -> str:
        return self.corpus or self.dataset

    def run_label(self) -> str:
        """The run's folder name under dense/<dataset>-<split>/."""
        return self.label or (f"dense-rerank-{self.rerank}" if self.rerank else "dense")


# The annotation chain, in order, and the stage each stage's prompt builds on (UtilSel and UtilRank
# read the pseudo-answer, which reads RelSel): the annotate stage runs it, the plan derives from it.
QA_METRIC_STAGE = "qametric"  # the QA-metric label baseline: an answer from each pool passage alone
ANNOTATION_STAGES = ["relsel", "answer", "utilsel", "utilrank", "graded", QA_METRIC_STAGE]
# Also on the chain, but not an annotate.stages choice: the querygen stage's question writing (one
# request per pool passage and prompt variant).
QUESTION_STAGE = "question"
# ... and the RAG stage's generator: one request per question and setting, over that setting's passages.
RAG_STAGE = "rag"
ANNOTATION_NEEDS = {"answer": "relsel", "utilsel": "answer", "utilrank": "answer"}

TRAINED_MODEL = "train:"  # IndexTarget.model prefix: a retriever fitted by the train stage in this run


class IndexConfig(Strict):
    model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2", description="the encoder: HF folder, hub name, or a packaged model"
    )
    # Encoding settings: None = as the model's encoder_spec.json says (a model trained here), else
    # the defaults in parentheses; a value set here overrides both.
    pooling: Literal["cls", "mean", "last"] | None = Field(
        None, description="token pooling; null: as the model's encoder_spec.json says, else mean"
    )
    normalize: bool | None = Field(
        None, description="L2-normalise embeddings; null: as the model's encoder_spec.json says, else true"
    )
    query_prefix: str | None = Field(
        None, description='text put before each query; null: as the model\'s encoder_spec.json says, else ""'
    )
    passage_prefix: str | None = Field(
        None, description='text put before each passage; null: as the model\'s encoder_spec.json says, else ""'
    )
    query_max_len: int | None = Field(
        None, gt=0, description="query tokens kept; null: as the model's encoder_spec.json says, else 64"
    )
    passage_max_len: int | None = Field(
        None, gt=0, description="passage tokens kept; null: as the model's encoder_spec.json says, else 256"
    )
    batch_size: int = Field(64, gt=0, description="texts per encoder call")
    encoders: int = Field(1, ge=1, description="encoding actors (one model replica each); the pool's minimum")
    max_encoders: int | None = Field(
        None, ge=1, description="autoscale the encoder pool up to this many; null: a fixed pool of `encoders`"
    )
    use_gpu: bool = Field(False, description="a GPU per encoder and per shard actor, and a FAISS GPU index")
    # bf16 on CPU: measured here (Xeon with AMX) 2.0x fp32's docs/s at 256 tokens and 2.3x at 128, cosine to
    # the fp32 embeddings >= 0.99998 (all-MiniLM-L6-v2, SciFact abstracts).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="encoder arithmetic: auto (fp16 on GPU, fp32 on CPU), fp32, bf16 (autocast; on a CPU with AMX "
        "about 2x fp32), fp16 (GPU only)",
    )
    embedding_dtype: Literal["float32", "float16"] = Field("float32", description="stored embedding precision")
    rows_per_file: int = Field(2048, gt=0, description="embedding Parquet part size; shards take whole parts")
    shards: int = Field(2, ge=1, description="index shard actors; each searches its part and the results are merged")
    index_type: Literal["flat", "ivf_flat", "ivf_pq", "hnsw"] = Field(
        "flat", description="the FAISS index of each shard"
    )
    nlist: int = Field(1024, description="IVF lists per shard (shrunk to shard size / 39 for small shards)")
    # 64: the smallest nprobe with recall@100 >= 0.95 vs Flat at nlist 1024 (0.962, 4.5x Flat's QPS,
    # 2 FAISS threads, 1,000-query batch) on 100k vectors matched to the real MiniLM SciFact embeddings
    # (all 5,183 as anchors + covariance noise; benchmarks/index_search.py, `ivf_sweep`). nlist 2048 reached
    # 0.948-0.951 at nprobe 64 (7.7-8.5x) over two runs; nprobe 32 at nlist 1024 gives 0.916 (8x).
    nprobe: int = Field(
        64,
        description="IVF lists searched per query; 64 is the smallest with recall@100 >= 0.95 vs Flat at "
        "nlist 1024 (measured 0.962, 4.5x Flat's QPS; benchmarks/index_search.py)",
    )
    pq_m: int = Field(16, description="ivf_pq: sub-quantizers per vector")
    hnsw_m: int = Field(32, description="hnsw: neighbours per node")
    ef_search: int = Field(128, description="hnsw: search depth")
    # GPU: fp16 storage for flat (useFloat16) and ivf_flat (stored as IVF-SQfp16); ivf_pq: fp16 lookup tables
    gpu_fp16: bool = Field(
        False,
        description="GPU only: fp16 storage for flat (useFloat16) and ivf_flat (as IVF-SQfp16); "
        "ivf_pq: fp16 lookup tables",
    )
    threads_per_shard: int | None = Field(1, description="FAISS threads per shard actor; null: FAISS's default")
    cpus_per_shard: float | None = Field(None, description="CPUs each shard actor reserves; null: threads_per_shard")
    shard_start_timeout_s: float = Field(
        300, gt=0, description="fail (not hang) when the shard actors cannot be placed within this many seconds"
    )
    search_retries: int = Field(0, ge=0, description="restart a dead shard from the saved index and retry")
    k: int = Field(1000, gt=0, description="results per query")
    targets: list[IndexTarget] = Field([], description="the searches to run, one run each")
    trained_targets: list[IndexTarget] = Field(
        [],
        description="searches run with every retriever the train stage fits (one per train setting): each becomes "
        "a target with model train:<setting> labelled <setting> (or <setting>-<label>)",
    )

    @field_validator("max_encoders")
    @classmethod
    def _pool_grows(cls, v: int | None, info) -> int | None:
        if v is not None and v < info.data.get("encoders", 1):
            raise ValueError(f"must be >= encoders ({info.data['encoders']}), or null for a fixed pool")
        return v

    @field_validator("precision")
    @classmethod
    def _fp16_on_gpu(cls, v: str, info) -> str:
        if v == "fp16" and not info.data.get("use_gpu"):
            raise ValueError("fp16 encoding needs index.use_gpu: true (on CPU use bf16 or fp32)")
        return v

    @field_validator("index_type")
    @classmethod
    def _buildable(cls, v: str, info) -> str:
        if v == "hnsw" and info.data.get("use_gpu"):  # refused here, before any encoding
            raise ValueError(HNSW_ON_GPU)
        return v


class RunToEvaluate(Strict):
    dataset: str = Field(description="an ingested dataset")
    split: str | None = Field(None, description="qrels split; null: all of the dataset's qrels")
    run: str = Field(description='a TREC run file, an ingested run, "bm25s" (the BM25 stage) or a dense run\'s label')
    label: str | None = Field(None, description="the run's name in the tables; null: `run`")
    setting: str | None = Field(
        None,
        description="the train setting whose retriever made this run (tested against evaluate.settings_baseline); "
        "set by evaluate.trained",
    )


class EvaluateConfig(Strict):
    metrics: list[str] = Field(
        ["nDCG@10", "MRR@10", "R@100", "R@1000", "MAP"],
        description="nDCG@k, MRR@k, R@k, P@k, MAP, or any ir_measures name",
    )
    runs: list[RunToEvaluate] = Field([], description="the runs to evaluate")
    baseline: str | None = Field(
        None, description="label of the run the others (same dataset) are tested against; null: no tests"
    )
    trained: bool = Field(
        True, description="also evaluate every run of index.trained_targets (each train setting's retriever)"
    )
    settings_baseline: str | None = Field(
        "human",
        description="the train setting the other settings' runs are tested against (the paper: human labels); "
        "null: evaluate.baseline",
    )
    permutations: int = Field(10_000, ge=100, description="randomisation test samples")


class AnnotateTarget(Strict):
    dataset: str = Field(description="an ingested dataset with pools")
    split: str = Field(description="the pools built for <dataset>-<split>")
    max_queries: int | None = Field(
        None, ge=1, description="a seeded subset of the pools' queries (small local runs); null: all"
    )


class Sampling(Strict):
    """Decoding (default greedy: RAG's answers, as the paper) and constrained decoding (vLLM structured
    outputs, regex)."""

    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0: greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    seed: int = Field(0, description="sampling and engine seed")
    max_tokens: int = Field(256, ge=1, description="output tokens of a selection / ranking / grade")
    answer_max_tokens: int = Field(256, ge=1, description="output tokens of the pseudo-answer")
    constrained: bool = Field(False, description="vLLM structured outputs: a regex for each stage's answer format")


class AnnotationSampling(Sampling):
    """The annotator's decoding. The paper does not say; the authors' code samples at temperature 0.6,
    top-p 0.95 (seeded per request), so that is the default; temperature 0 is greedy."""

    temperature: float = Field(
        0.6, ge=0, description="sampling temperature (the authors' code: 0.6; the paper is silent); 0: greedy"
    )
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass (the authors' code: 0.95)")


class AnnotateEngine(Strict):
    """One vLLM engine replica: model loading, parallelism, memory, placement."""

    dtype: str = Field("auto", description="vLLM model dtype (auto, float32, float16, bfloat16)")
    quantization: str | None = Field(None, description="vLLM quantization method (e.g. gptq); null: as the model says")
    revision: str | None = Field(
        None,
        description="a hub model's revision (a commit hash pins it: every node loads the same weights); null: "
        "the hub's main. A model folder on s3:// or gs:// is copied once per node instead",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica that split each layer")
    pipeline_parallel_size: int = Field(1, ge=1, description="GPUs per replica that split the layers into stages")
    max_model_len: int = Field(
        8192, ge=16, description="context length; a longer prompt is not sent but reported (prompt_too_long)"
    )
    max_num_batched_tokens: int | None = Field(None, description="vLLM's tokens per scheduler step; null: vLLM's")
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM's most requests in one batch; null: vLLM's")
    async_engine: bool = Field(
        True,
        description="vLLM's AsyncLLM: each query moves to its next stage as soon "
        "as its requests finish, and "
        "several blocks share the engine (scale.blocks_per_replica); false: LLM.generate, one call per "
        "stage wave of a block",
    )
    in_process: bool = Field(
        False,
        description="with async_engine: false, vLLM's EngineCore runs in the replica's own process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0): a start ~15 s shorter on CPU (one vLLM import, not two); small CPU "
        "runs and tests only: an engine death then ends the replica before it is counted (engine_deaths_per_replica "
        "and query_tries do not see it), and Ray retries its block",
    )
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of shared prompt prefixes")
    enforce_eager: bool = Field(False, description="skip torch.compile: engine start in seconds (CPU, tests)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of GPU memory vLLM may take (GPU replicas)"
    )
    use_gpu: bool = Field(
        False, description="a GPU per engine worker (tp x pp per replica, on one node); false: vLLM-CPU"
    )
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type of the replicas' nodes (e.g. A100-80G); null: any"
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPU replicas: CPUs Ray reserves per engine")
    kv_cache_gib: int = Field(2, ge=1, description="CPU replicas: VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    cpu_threads_bind: str | None = Field(
        None, description='CPU replicas: VLLM_CPU_OMP_THREADS_BIND (e.g. "0-1"); null: vLLM\'s binding'
    )

    @model_validator(mode="after")
    def _in_process_is_the_sync_engine(self) -> AnnotateEngine:
        if self.in_process and self.async_engine:
            raise ValueError("in_process needs async_engine: false (vLLM's AsyncLLM always starts its own EngineCore)")
        return self


class AnnotateScale(Strict):
    """The actor pool: autoscaling, batching, fault tolerance, progress."""

    replicas: tuple[int, int] = Field((1, 1), description="autoscaling range of the actor pool: [min, max] replicas")
    batch_size: int = Field(
        16,
        ge=1,
        description="queries per actor call (every stage of them; a RAG query is one question and setting), one "
        "Parquet part per call (progress and resume granularity)",
    )
    blocks_per_replica: int = Field(
        2,
        ge=1,
        description="with engine.async_engine: blocks of queries in flight on one "
        "replica at once (the next block's requests fill the engine while the last one's stragglers finish)",
    )
    progress_every_s: float = Field(10.0, gt=0, description="seconds between progress lines")
    no_progress_timeout_s: float = Field(
        3600.0,
        description="Ray Data's no-progress guard (DataContext.execution_no_progress_timeout_s, 1,800 s by "
        "default), which fails the job when no output leaves any operator for this long; -1 disables it. A "
        "replica task is one block (batch_size queries: ~30-60 s on an A100-80G replica), but the first one "
        "ends only after GPU nodes launch (5-15 min) and a 32B model loads (10-20 min)",
    )

    query_tries: int = Field(
        3,
        ge=1,
        description="tries of a query whose requests fail (an exception, or its engine "
        "dying with it in flight) before it becomes an error row (errors.parquet: query, stage, reason) and the job "
        "goes on",
    )
    max_error_fraction: float = Field(
        0.001,
        ge=0,
        le=1,
        description="fail the job (after writing errors.parquet) above this share of "
        "error rows, like ingest.reject_threshold",
    )
    engine_deaths_per_replica: int = Field(
        3,
        ge=0,
        description="engine deaths one replica may have (a block's first death counts; "
        "later deaths of the same block and of its queries run alone are the input's); each exits the replica, "
        "which Ray restarts with its block retried; one more fails the job (a machine that keeps killing engines)",
    )
    engine_start_retries: int = Field(
        2,
        ge=-1,
        description="consecutive replicas whose engine fails to start that are replaced "
        "by fresh ones (Ray Data's DataContext.max_consecutive_actor_init_deaths, 0 by default) before the job fails "
        "with the engine's message; -1: no limit",
    )

    @field_validator("no_progress_timeout_s")
    @classmethod
    def _guard_positive_or_off(cls, value: float) -> float:
        if value <= 0 and value != -1:
            raise ValueError("must be positive, or -1 to disable Ray Data's no-progress guard")
        return value


class QAMetricLabels(Strict):
    """The downstream-QA-metric label baseline (docs/method.md "QA-metric labels"): the generator answers the
    question from each pool passage alone (greedy, the RAG prompt), each answer is scored against the gold
    answers, and the passages that answer best are the positives."""

    answers: str | None = Field(
        None,
        description="the ingested QA dataset whose qa table gives the gold answers, by query id (MS MARCO QnA "
        "for MS MARCO's training queries); null: the annotated dataset itself",
    )
    metric: Literal["f1", "em", "rouge_l"] = Field(
        "f1", description="an answer's score: SQuAD token F1, exact match, or ROUGE-L (MS MARCO's), max over golds"
    )
    rule: Literal["best", "threshold"] = Field(
        "best",
        description="best: the passages whose answer scores the query's best score (ties all count), when that "
        "score reaches min_score; threshold: every passage scoring min_score or more",
    )
    min_score: float = Field(0.5, gt=0, le=1, description="the lowest score that makes a positive")
    max_tokens: int = Field(32, ge=1, description="output tokens of one answer (a short answer is what is scored)")


class AnnotateConfig(Strict):
    """The LLM annotation stage (docs/method.md §1-2): vLLM replicas on a Ray Data actor pool."""

    model: str = Field(
        description="the annotating LLM: HF folder, hub name, or a packaged model (HuggingFaceTB/SmolLM2-135M-Instruct)"
    )
    targets: list[AnnotateTarget] = Field([], description="the pools to annotate")
    stages: list[Literal["relsel", "answer", "utilsel", "utilrank", "graded", "qametric"]] | Literal["needed"] = Field(
        ["relsel", "answer", "utilsel", "utilrank"],
        description="the stages to run (graded: the pointwise 0-3 judge, an addition; qametric: the QA-metric "
        "baseline's answer from each pool passage alone, annotate.qametric); needed: those the train "
        "settings' labels need (utilsel: relsel, answer, utilsel), the four without a train section",
    )
    output_name: str | None = Field(
        None,
        description="the output folder's suffix: null: output_dir/annotate/<dataset>-<split>; "
        "else output_dir/annotate/<dataset>-<split>-<output_name>",
    )
    window: int = Field(16, ge=2, description="at most this many passages per listwise prompt (31 -> 16 + 15)")
    layout: Literal["paper", "shared_prefix"] = Field(
        "paper",
        description="the prompts' turn order: paper (as the paper); shared_prefix: the same turns and words with the "
        "passages first, so UtilSel and UtilRank over the same RelSel set share a cached prefix (an option: "
        "benchmarks/annotation_cost.py counts its tokens, benchmarks/layout_agreement.py its labels)",
    )
    passage_words: int = Field(300, ge=1, description="passages are cut to this many words (the cut is recorded)")
    human_positive: Literal["random", "inclusion", "exclusion"] = Field(
        "random",
        description="the human positive: judged like any pool passage (random), forced positive in the LLM "
        "labels (inclusion), or left out of the prompts and the LLM labels (exclusion)",
    )
    utilrank_top_percent: float = Field(
        10.0, gt=0, le=100, description="UtilRank positives: the top k%, rounded down, at least 1"
    )
    graded_queries: int | None = Field(
        None,
        ge=1,
        description="the pointwise judge: a seeded subset of queries (one prompt per pool passage); null: all",
    )
    graded_threshold: int = Field(2, ge=0, le=3, description="graded label counted positive")
    qametric: QAMetricLabels = Field(
        default_factory=QAMetricLabels, description="the QA-metric label baseline (stage qametric)"
    )
    sampling: AnnotationSampling = Field(
        default_factory=AnnotationSampling, description="sampling and constrained decoding"
    )
    engine: AnnotateEngine = Field(default_factory=AnnotateEngine, description="the vLLM engine of each replica")
    scale: AnnotateScale = Field(default_factory=AnnotateScale, description="the actor pool and fault tolerance")

    def chain_stages(self) -> list[str]:
        """The stages the chain runs: set by the annotate stage from utilrag.plan.annotate_stages (or by
        querygen / judge) before the chain sees this section; [] while unresolved."""
        return list(self.stages) if isinstance(self.stages, list) else []

    def content_settings(self) -> dict[str, Any]:
        """The settings that change what a stage's rows contain, flat (the stage fingerprint's keys).

        Scale settings and the engine's placement do not: a stage can be resumed with another
        batch size or replica count."""
        return {
            "model": self.model,
            "window": self.window,
            "passage_words": self.passage_words,
            "human_positive": self.human_positive,
            **self.sampling.model_dump(),
            # greedy decoding ignores top_p: its default moving (1.0 -> 0.95) must not redo a greedy annotation
            **({"top_p": 1.0} if self.sampling.temperature == 0 else {}),
            **self.engine.model_dump(include={"dtype", "quantization", "max_model_len"}),
            **({"revision": self.engine.revision} if self.engine.revision else {}),  # unset: old fingerprints hold
            **({"layout": self.layout} if self.layout != "paper" else {}),  # the paper's: old fingerprints hold
        }


class QueryGenConfig(Strict):
    """Questions written by an LLM for sampled passages, when a corpus has none (InPars / Promptagator
    style, docs/method.md "Query generation"), on the annotation chain's runner (annotate.engine / scale)."""

    dataset: str = Field(description="an ingested dataset (your own corpus): its passages are sampled")
    model: str | None = Field(
        None, description="the question-writing LLM; null: annotate.model (HF folder, hub name or packaged model)"
    )
    passages: int = Field(1000, ge=1, description="a seeded sample of this many passages gets questions")
    per_passage: int = Field(
        1, ge=1, le=3, description="questions per passage: each from another order of the few-shot examples"
    )
    heldout_percent: float = Field(
        20.0,
        ge=0,
        lt=100,
        description="documents (not passages) whose questions are evaluation queries (qrels split gen-test); the "
        "others' are training queries (gen-train): no retriever is scored on questions from its training documents",
    )
    filter: Literal["bm25", "none"] = Field(
        "bm25",
        description="keep a question only when BM25 ranks its source passage in the top filter_k; none: keep all",
    )
    filter_k: int = Field(20, ge=1, description="the BM25 filter's depth")
    min_words: int = Field(3, ge=1, description="a shorter question is dropped (counted)")
    max_tokens: int = Field(48, ge=8, description="output tokens of one question")
    temperature: float = Field(
        0.0,
        ge=0,
        description="0: greedy (InPars), the prompt variants make a passage's questions differ; above 0: sampled "
        "(Promptagator)",
    )
    seed: int = Field(0, description="seed of the passage sample and of the held-out documents")


class JudgeTarget(Strict):
    dataset: str = Field(description="an ingested dataset whose runs are judged")
    split: str = Field(description="the queries judged: a qrels split (gen-test for generated queries) or 'all'")
    max_queries: int | None = Field(None, ge=1, description="a seeded subset of the queries; null: all")


class JudgeConfig(Strict):
    """Evaluation without qrels: the union of every evaluated run's top passages per query, graded 0-3 by
    the pointwise judge (UMBRELA-style, annotate's graded prompt), written as qrels with their provenance."""

    model: str | None = Field(
        None,
        description="the judging LLM; null: annotate.model (then it judges its own labels' retrievers: circular, "
        "and said so). Set apart from the annotator when you can",
    )
    targets: list[JudgeTarget] = Field([], description="the dataset splits whose runs are judged")
    depth: int = Field(
        10,
        ge=2,
        description="each evaluated run's top-k per query enters the judged pool (a pool of one is not judged)",
    )
    threshold: int = Field(
        2, ge=1, le=3, description="a judged grade counted relevant (binary metrics, and the kappa against qrels)"
    )


class TrainSetting(Strict):
    """One retriever of a comparison: the train section's keys, with these ones changed."""

    name: str = Field(description="the run folder (output_dir/train/<name>/) and the label of its dense runs")
    labels: Literal["human", "relsel", "utilsel", "utilrank", "graded", "qametric", "external"] | None = Field(
        None, description="the positives; null: train.labels"
    )
    labels_path: str | None = Field(None, description="labels table; null: train.labels_path")
    loss: Literal["single", "rand1", "joint", "summarg"] | None = Field(None, description="null: train.loss")
    positives: Literal["all", "one", "rand1", "avg"] | None = Field(None, description="null: train.positives")
    human_mix_percent: float | None = Field(
        None, ge=0, le=100, description="union with the human labels of X% of queries; null: train.human_mix_percent"
    )
    curriculum_human_percent: float | None = Field(
        None, ge=0, le=100, description="curriculum stage 2 on X% human labels; null: train.curriculum_human_percent"
    )
    curriculum_epochs: int | None = Field(None, ge=1, description="null: train.curriculum_epochs")
    epochs: int | None = Field(None, ge=1, description="null: train.epochs")
    seed: int | None = Field(None, description="null: train.seed")


class TrainConfig(Strict):
    """The retriever training stage (Ray Train + DeepSpeed; docs/method.md §3-4)."""

    model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="the initial encoder: HF folder, hub name, or a packaged model",
    )
    dataset: str = Field("scifact", description="an ingested dataset with pools")
    split: str = Field("train", description="qrels split (human labels) and pools (<dataset>-<split>) to train on")
    labels: Literal["human", "relsel", "utilsel", "utilrank", "graded", "qametric", "external"] = Field(
        "human",
        description="the positives: human qrels, an annotate stage's labels (qametric: the QA-metric baseline), or "
        "external: labels made elsewhere "
        "(the authors' published ones, a user's), the file at labels_path (query_id, doc_id[, score or rank]; "
        "JSONL, TSV, TREC qrels or Parquet)",
    )
    labels_path: str | None = Field(
        None, description="labels table; null: output_dir/annotate/<dataset>-<split>/labels.parquet"
    )
    pooling: Literal["cls", "mean", "last"] = Field("cls", description="token pooling")
    normalize: bool = Field(False, description="L2-normalise embeddings (cosine scores)")
    shared_encoder: bool = Field(
        True, description="one tower for queries and passages; false: a separate passage tower"
    )
    temperature: float = Field(1.0, gt=0, description="scores are q.d / temperature")
    query_max_len: int = Field(32, gt=0, description="query tokens kept")
    passage_max_len: int = Field(140, gt=0, description="passage tokens kept")
    loss: Literal["single", "rand1", "joint", "summarg"] = Field(
        "summarg", description="SingleLH / Rand1LH / JointLH / SumMargLH (docs/method.md §4)"
    )
    group_size: int = Field(16, ge=2, description="passages per query in a group (m + 1)")
    positives: Literal["all", "one", "rand1", "avg"] = Field(
        "all",
        description="positive sampling: all (Pos-all), one (Pos-one: one positive per query, drawn once with the "
        "seed and kept every epoch), rand1 "
        "(one drawn each epoch), avg (Pos-avg: every positive, JointLH averaged over them; loss: joint)",
    )
    human_mix_percent: float | None = Field(
        None, ge=0, le=100, description="union the LLM labels with the human labels of X% of queries; null: none"
    )
    curriculum_human_percent: float | None = Field(
        None, ge=0, le=100, description="curriculum stage 2 on the human labels of X% of queries; null: no stage 2"
    )
    curriculum_epochs: int = Field(1, ge=1, description="epochs of curriculum stage 2")
    epochs: int = Field(2, ge=1, description="epochs over the training groups")
    lr: float = Field(3e-5, gt=0, description="peak AdamW learning rate")
    # The paper gives neither; the authors' Tevatron runs leave both at 0 (Hugging Face's defaults).
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of steps with a linear warmup, then linear decay (the authors' code: 0; the paper: silent)",
    )
    weight_decay: float = Field(0.0, description="AdamW weight decay (the authors' code: 0; the paper is silent)")
    per_device_queries: int = Field(16, ge=1, description="queries per worker per step")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each worker reserves")
    use_gpu: bool = Field(False, description="a GPU per worker")
    deepspeed_zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPU (when supported), fp32 on CPU"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    checkpoint_every_s: float = Field(
        600.0, gt=0, description="wall-clock seconds between checkpoints (rank 0's clock)"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint every N steps; null: by wall time only"
    )
    max_failures: int = Field(1, ge=0, description="Ray Train restarts (from the last checkpoint) before the run fails")
    seed: int = Field(0, description="seed of weights, sampling and data order")
    max_queries: int | None = Field(
        None, description="a seeded subset of the training queries (small local runs); null: all"
    )
    max_steps: int | None = Field(None, description="cap on the steps of each phase; null: whole epochs")
    name: str = Field("run", description="the run folder: output_dir/train/<name>/ (without settings)")
    settings: list[TrainSetting] = Field(
        [],
        description="one retriever per entry (label settings: human, relsel, utilsel, utilrank, curriculum …), "
        "each this section with the entry's keys changed; empty: one retriever, `name`",
    )

    def runs(self) -> list[TrainConfig]:
        """The retrievers to fit: one per setting (the section's keys with the setting's changed), or this one."""
        if not self.settings:
            return [self]
        return [self._with(s) for s in self.settings]

    def _with(self, setting: TrainSetting) -> TrainConfig:
        base = self.model_dump(exclude={"settings"})
        return TrainConfig.model_validate({**base, **setting.model_dump(exclude_none=True)})  # null: the section's

    @model_validator(mode="after")
    def _settings_are_runs(self) -> TrainConfig:
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"settings: two entries are named {next(n for n in names if names.count(n) > 1)!r}")
        for setting in self.settings:
            try:
                self._with(setting)
            except ValidationError as e:
                reason = e.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"setting {setting.name!r}: {reason}") from None
        return self

    @model_validator(mode="after")
    def _external_labels_name_their_file(self) -> TrainConfig:
        if self.labels == "external" and not self.labels_path:
            raise ValueError("labels 'external' reads labels_path: give the file of (query_id, doc_id) positives")
        return self

    @model_validator(mode="after")
    def _loss_fits_the_positives(self) -> TrainConfig:
        """SingleLH / Rand1LH score one positive per group: with several, the extra ones would silently
        count as negatives. Pos-avg averages JointLH's per-positive terms."""
        if self.loss in ("single", "rand1") and self.positives in ("all", "avg"):
            want = "one" if self.loss == "single" else "rand1"
            raise ValueError(
                f"loss {self.loss!r} trains on one positive per group, but positives={self.positives!r} puts "
                f"several in it (the extra ones would count as negatives): set train.positives: {want}"
            )
        if self.positives == "avg" and self.loss != "joint":
            raise ValueError(
                f"positives 'avg' averages JointLH over the positives: set train.loss: joint, not {self.loss!r}"
            )
        return self


class RagRetriever(Strict):
    """Where the passages come from: a run the BM25 or index stage wrote for the QA dataset."""

    run: str = Field(description="'bm25s' (the BM25 stage's run) or a dense run's label (the index stage's)")
    label: str | None = Field(None, description="the row's name in the report; null: the run's name")


@functools.cache
def bert_score_layers() -> dict[str, int]:
    """bert-score's table of the models it knows and the layer it uses for each (``model2layers``), read
    from its source: importing the package loads torch and transformers (seconds), too slow for a config."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("bert_score")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("rag.bertscore needs the bert-score package (pip install bert-score; in both locks)")
    source = Path(spec.submodule_search_locations[0], "utils.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "model2layers" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


class BertScoreConfig(Strict):
    """BERTScore of the answers against their references (Zhang et al. 2020, the bert-score package):
    the paper reports it for MS MARCO QA (rag-msmarco-qa)."""

    model: str = Field(
        "roberta-large",
        description="the encoder: a name bert-score knows (roberta-large: its English default, downloaded by name), "
        "or any local, packaged or hub encoder with num_layers",
    )
    num_layers: int | None = Field(
        None, ge=1, description="the layer whose token embeddings are matched; null: bert-score's for a known model"
    )
    batch_size: int = Field(64, ge=1, description="answers per forward pass")

    @model_validator(mode="after")
    def _layers_known(self) -> BertScoreConfig:
        if self.num_layers is None:
            if self.model not in bert_score_layers():
                raise ValueError(f"model {self.model!r} is not one bert-score knows: set rag.bertscore.num_layers")
        return self


class RagConfig(Strict):
    """RAG evaluation (docs/method.md §5): retrieve top-k, generate with vLLM, score the answers."""

    dataset: str = Field(description="an ingested QA dataset (ingest layout qa, e.g. squad-v1.1-dev): the questions")
    corpus: str | None = Field(
        None,
        description="the ingested dataset whose passages are retrieved (nq-open: a Wikipedia corpus; hotpotqa: BEIR's "
        "hotpotqa corpus; MS MARCO QnA: msmarco-passage): the runs are searches of rag.dataset's questions over it "
        "(bm25 / index targets with this corpus); recall@k then needs shared passage ids and is left out. null: "
        "rag.dataset's own passages",
    )
    split: str = Field("dev", description="its qrels split (gold passages)")
    max_questions: int | None = Field(200, ge=1, description="a seeded sample of the questions; null: all")
    seed: int = Field(0, description="seed of the question sample")
    k: list[int] = Field([1, 5], description="passages given to the generator (top-k of each retriever)")
    retrievers: list[RagRetriever] = Field([], description="the runs to take passages from")
    closed_book: bool = Field(True, description="also a row without passages (k = 0): the floor")
    oracle: bool = Field(True, description="also a row with the gold passage: the ceiling")
    passage_words: int = Field(300, ge=1, description="passages are cut to this many words")
    baseline: str | None = Field(
        "closed-book", description="the row the others are tested against (paired tests on F1); null: none"
    )
    permutations: int = Field(10_000, ge=100, description="randomisation test samples")
    bertscore: BertScoreConfig | None = Field(None, description="BERTScore of the answers too; null: not computed")
    model: str = Field(description="generator: HF folder, hub name, or a packaged model")
    sampling: Sampling = Field(Sampling(answer_max_tokens=64), description="decoding (greedy by default, as the paper)")
    engine: AnnotateEngine = Field(AnnotateEngine(), description="the vLLM engine replicas")
    scale: AnnotateScale = Field(
        AnnotateScale(),
        description="the actor pool and fault tolerance (RAG runs on the annotation chain's runner: a one-stage chain)",
    )


class ReportConfig(Strict):
    """The report stage (output_dir/report/): its notes and the settings of its GPU-hour estimate."""

    notes: list[str] = Field(
        [], description="lines printed at the top of the report (a local run's caps, what it leaves out)"
    )

    prefill_tokens_per_s: float = Field(
        cost.MEASURED_PREFILL_TOKENS_PER_S,
        gt=0,
        description="MEASURED prompt tokens/s of one GPU (utilrag.cost: Qwen2.5-32B in bf16 on an H200, plain "
        "PyTorch) for the GPU-hour estimate at MS MARCO scale; set your own GPU's measurement",
    )
    vllm_efficiency: float = Field(
        cost.ASSUMED_VLLM_EFFICIENCY,
        gt=0,
        le=1,
        description="ASSUMED share of that prefill rate vLLM reaches (no vLLM ran on the GPU)",
    )
    decode_tokens_per_s: float = Field(
        cost.ASSUMED_DECODE_TOKENS_PER_S, gt=0, description="ASSUMED output tokens/s of one GPU"
    )
    throughput_of: str = Field(
        cost.MEASURED_PREFILL_OF,
        description="what prefill_tokens_per_s was measured on (printed beside the estimate)",
    )
    scale_queries: int = Field(
        491_007, gt=0, description="queries of the GPU-hour estimate (MS MARCO passage train: 491,007)"
    )


class PipelineConfig(Strict):
    data_root: str | None = Field(
        None,
        description="where registered datasets live; null: $UTILRAG_DATA_ROOT, else ../shared/datasets beside "
        "the checkout, else ~/.cache/utilrag/datasets",
    )
    output_dir: str = Field("outputs/local", description="every stage writes under this folder")
    ray: RayConfig = Field(RayConfig(), description="the Ray cluster")
    ingest: IngestConfig = Field(description="the ingest stage: datasets into Parquet tables")
    pools: list[PoolsConfig] = Field([], description="candidate pools, one per dataset split")
    bm25: list[BM25Config] = Field([], description="BM25 runs (bm25s), one per dataset split")
    index: IndexConfig = Field(IndexConfig(), description="dense retrieval: encoding, the sharded index, search")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="metrics and significance tests")
    querygen: QueryGenConfig | None = Field(None, description="questions for a corpus that has none; null: none")
    annotate: AnnotateConfig | None = Field(None, description="the LLM annotation stage; null: none")
    judge: JudgeConfig | None = Field(None, description="LLM-judged qrels for evaluation without them; null: none")
    train: TrainConfig = Field(TrainConfig(), description="retriever training")
    rag: RagConfig | None = Field(None, description="the RAG evaluation; null: none")
    report: ReportConfig = Field(ReportConfig(), description="the report stage (report.md / .html / .json)")

    @model_validator(mode="before")
    @classmethod
    def _expand_dataset_groups(cls, data: Any) -> Any:
        """An entry naming a dataset group (cqadupstack) becomes one entry per member."""
        if not isinstance(data, dict):
            return data

        def expand(entries, key="dataset"):
            if not isinstance(entries, list):
                return entries
            out = []
            for e in entries:
                group = e.get(key) if isinstance(e, dict) else None
                if group in DATASET_GROUPS:
                    for member in DATASET_GROUPS[group]:
                        item = {**e, key: member}
                        if key == "name" and e.get("path"):
                            item["path"] = e["path"].rstrip("/") + "/" + member.split("-", 1)[1]
                        out.append(item)
                else:
                    out.append(e)
            return out

        data = dict(data)
        if isinstance(data.get("ingest"), dict):
            data["ingest"] = {**data["ingest"], "datasets": expand(data["ingest"].get("datasets"), "name")}
        for section in ("pools", "bm25"):
            data[section] = expand(data.get(section))
        for section, key in (("index", "targets"), ("index", "trained_targets"), ("evaluate", "runs")):
            if isinstance(data.get(section), dict) and key in data[section]:
                data[section] = {**data[section], key: expand(data[section][key])}
        return {k: v for k, v in data.items() if v is not None or k not in ("pools", "bm25")}

    @model_validator(mode="after")
    def _trained_targets_have_a_train_section(self) -> PipelineConfig:
        """index.trained_targets names the searches of each train setting's retriever (derived by
        utilrag.plan, not written into this tree): without a train section there is none."""
        if self.index.trained_targets and "train" not in self.model_fields_set:
            raise ValueError("index.trained_targets: there is no train section to take the retrievers from")
        return self

    @model_validator(mode="after")
    def _one_writer_per_folder(self) -> PipelineConfig:
        """Two entries that would write the same output folder would overwrite each other's work."""
        from utilrag.plan import index_targets  # the plan reads this module's types

        for section, keys in (
            ("pools", [(p.dataset, p.split) for p in self.pools]),
            ("bm25", [(b.dataset, b.split) for b in self.bm25]),
            (
                "index.targets",  # those written and those each train setting's retriever adds
                [(t.dataset, t.split, t.run_label()) for t in index_targets(self)],
            ),
        ):
            seen = set()
            for key in keys:
                if key in seen:
                    raise ValueError(f"{section}: two entries write {'/'.join(str(k) for k in key)}; give them labels")
                seen.add(key)
        return self

    @model_validator(mode="after")
    def _dense_candidates_name_a_search(self) -> PipelineConfig:
        """pools.dense is an untrained encoder's search of the pooled queries: searched before the pools exist."""
        for p in self.pools:
            if p.dense is None:
                continue
            found = [t for t in self.index.targets if t.run_label() == p.dense and t.dataset == p.dataset]
            if not found:
                raise ValueError(
                    f"pools ({p.dataset}/{p.split}): dense {p.dense!r} names no index.targets entry of dataset "
                    f"{p.dataset!r} with that label"
                )
            target = found[0]
            if (target.split or "all") != p.split or target.rerank or (target.model or "").startswith(TRAINED_MODEL):
                raise ValueError(
                    f"pools ({p.dataset}/{p.split}): dense {p.dense!r} must be a full search of split {p.split!r} "
                    f"with an off-the-shelf encoder (its target has split {target.split!r}, rerank "
                    f"{target.rerank!r}, model {target.model!r})"
                )
        return self

    @model_validator(mode="after")
    def _llm_stages_have_a_model(self) -> PipelineConfig:
        for name in ("querygen", "judge"):
            section = getattr(self, name)
            if section is not None and section.model is None and self.annotate is None:
                raise ValueError(f"{name}.model: no model (set it, or an annotate section whose model it takes)")
        return self

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
        reason = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], (dict, list)):
            reason += f" (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {reason}{more}"


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: sections merge key by key, any other value (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's tree; ``extends: <file>`` (relative to this file) is read first and this file's keys
    merged on top of it, so a variant names only what it changes (jobs/configs/paper/)."""
    if not path.is_file():
        where = f" (extended by {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: extends itself through {' -> '.join(str(p) for p in seen)}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected one file name (got {base!r})")
    return _deep_merge(_read_tree((path.parent / base), (*seen, path.resolve())), tree)


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), schema=PipelineConfig):
    """Read a YAML config (and the one it ``extends``), apply ``key=value`` overrides, validate against
    ``schema``."""
    path = Path(path)
    tree = _read_tree(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        apply_override(tree, key.strip(), _parse_value(raw))
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path))) from None
