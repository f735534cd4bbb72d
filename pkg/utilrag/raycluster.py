"""Connecting to Ray: the cluster in ``ray.address`` / $RAY_ADDRESS, or a local one started here."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from utilrag.config import RayConfig

T = TypeVar("T")


def quiet_ray_data() -> None:
    """Our stages print their own progress lines; Ray Data's per-dataset INFO lines drown them."""
    import ray

    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled": we turn them off below, on purpose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


TIME_COMPRESSION_ENV = "UTILRAG_TIME_COMPRESSION"


def compress_ray_data_clock(ctx) -> float:
    """Tests and rehearsals only (never a config): $UTILRAG_TIME_COMPRESSION = F divides Ray Data's
    issue-detector intervals (30 s each) by F, so a job shrunk by F still crosses as many detector
    rounds as the full-size job would. Returns F (1 when unset)."""
    import dataclasses

    from utilrag.errors import UtilragError
    from utilrag.logs import get_logger

    given = os.environ.get(TIME_COMPRESSION_ENV) or "1"
    try:
        factor = float(given)
    except ValueError:
        factor = 0.0
    if not factor > 0:
        raise UtilragError(f"${TIME_COMPRESSION_ENV}={given!r}: give a positive number (the time compression)")
    if factor != 1:
        detectors = dataclasses.replace(ctx.issue_detectors_config)
        intervals = {}
        for name in ("hanging_detector_config", "hash_shuffle_detector_config", "high_memory_detector_config"):
            config = getattr(detectors, name)
            if config.detection_time_interval_s > 0:  # -1: a detector turned off stays off
                interval = config.detection_time_interval_s / factor
                setattr(detectors, name, dataclasses.replace(config, detection_time_interval_s=interval))
                intervals[name.removesuffix("_detector_config")] = interval
        ctx.issue_detectors_config = detectors
        get_logger("ray").warning(
            f"time compressed by F = {factor:g} (${TIME_COMPRESSION_ENV}, tests and rehearsals only): Ray Data's "
            f"issue detectors every {', '.join(f'{k} {v:g}s' for k, v in intervals.items())}"
        )
    return factor


# Where object storage is, not who may read it: forwarded to the workers (an S3-compatible endpoint
# set only in the submitting shell would otherwise send them to AWS). Credentials are never
# forwarded (a runtime env is visible in the dashboard): workers take theirs from their nodes.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict:
    found = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": found} if found else {}


NODE_LABEL = "utilrag-node"  # on every node type of the cluster configs: cpu | gpu
_labelled = False  # ray.node_labels of the config this driver connected with


def node_selector(gpu: bool) -> dict[str, str]:
    """The label selector for CPU or GPU work on a cluster with labelled node types; {} otherwise."""
    return {NODE_LABEL: "gpu" if gpu else "cpu"} if _labelled else {}


def use_node_labels(on: bool) -> None:
    """Every Ray Data dataset of this driver asks for cpu nodes (its tasks, actors and Ray Data's own
    scale-up requests); an operator that asks for gpu nodes overrides it (operator-level selectors win
    on a key conflict)."""
    global _labelled
    import ray.data

    _labelled = on
    ray.data.DataContext.get_current().execution_options.label_selector = node_selector(False) or None


def on_a_cpu_node(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` as one Ray task with one CPU on a CPU node (labelled cpu where the cluster labels
    its nodes: never the head, never a GPU node), waited for; a user mistake raised there (a
    UtilragError) is raised here as itself: one line at the CLI, not Ray's remote traceback."""
    import ray

    from utilrag.errors import UtilragError

    placement = {"label_selector": node_selector(False)} if node_selector(False) else {}
    task = ray.remote(num_cpus=1, **placement)(fn)  # type: ignore[call-overload]
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UtilragError):
            raise e.cause from None
        raise


def forward_worker_output() -> bool:
    """Workers' output (vLLM's and Ray Train's logs, warnings, progress bars) on this console only at
    --log-level debug; otherwise it stays in Ray's per-worker log files (worker_logs_location)."""
    return logging.getLogger("utilrag").isEnabledFor(logging.DEBUG)


def worker_logs_location() -> str:
    """Where Ray writes the workers' output: this node's session logs (each node has its own)."""
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - only a hint for the user
        return "the logs/ folder of the Ray session on each node (`ray logs`, or the dashboard)"


_local_session = False  # this process started the cluster: its workers' log files are on this machine


def copy_worker_logs(dest: str) -> str | None:
    """The workers' output files of the local cluster this process started (vLLM's and Ray Train's
    output, warnings and tracebacks: ``worker-*.out|err``), copied into ``dest``; None when the cluster
    is elsewhere (its nodes keep them: ``ray logs`` or the dashboard)."""
    import glob
    import shutil

    if not _local_session:
        return None
    try:
        source = worker_logs_location()
        files = [f for pattern in ("worker-*.out", "worker-*.err") for f in glob.glob(os.path.join(source, pattern))]
        files = [f for f in files if os.path.getsize(f)]
        if not files:
            return None
        os.makedirs(dest, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest)
    except OSError:  # only logs: the run's outputs are committed already
        return None
    return dest


def connect(cfg: RayConfig) -> None:
    global _local_session
    import ray

    use_node_labels(cfg.node_labels)
    if ray.is_initialized():
        return
    forward = forward_worker_output()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Ship this copy of the library to the workers, so a cluster runs the code that was
        # submitted (it is merged with the job's runtime env, e.g. its working_dir and pip list).
        package = str(Path(__file__).resolve().parent)
        ray.init(address=address, log_to_driver=forward, runtime_env={"py_modules": [package], **forwarded_env()})
    else:
        _local_session = True
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            log_to_driver=forward,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    if not forward:
        from utilrag.logs import get_logger

        get_logger("ray").info(f"workers' output (vLLM, Ray Train, Ray Data) in {worker_logs_location()}")
    quiet_ray_data()
