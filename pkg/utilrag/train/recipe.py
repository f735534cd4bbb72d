"""The training recipe: Ray Train's TorchTrainer around a DeepSpeed engine, one worker loop.

Driver: have a task on a CPU node write the phases' training groups (one file per phase and worker,
train/dataset.py), fit, print rank 0's progress, then plot the loss curve. Worker: set up model and
engine, read and tokenise its own file, train, checkpoint every N steps through ``ray.train.report``,
resume from the latest checkpoint after a failure.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from utilrag import store
from utilrag.config import PipelineConfig, TrainConfig
from utilrag.data.dataset import open_dataset
from utilrag.data.tables import fingerprint
from utilrag.encoder_spec import model_identity, model_reference, resolve_model
from utilrag.errors import UtilragError
from utilrag.logs import get_logger
from utilrag.raycluster import node_selector
from utilrag.stages import StageResult
from utilrag.store import Store
from utilrag.summaries import TrainSummary
from utilrag.train.engine import (
    CheckpointClock,
    encoder_spec,
    new_phase_schedule,
    reset_optimizer_state,
    save_hf_model,
    setup_model_and_engine,
    train_step,
)

__all__ = ["run_train", "setup_model_and_engine", "train_step", "train_loop_per_worker"]

log = get_logger("train")


# --------------------------------------------------------------------------- worker side
def report_metrics_and_save_checkpoint(engine, metrics: dict, state: dict, save: bool) -> None:
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ckpt")  # every rank writes its own (ZeRO) part
        if ray.train.get_context().get_world_rank() == 0:
            Path(tmp, "state.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _fault_kill_at() -> tuple[int, int] | None:
    """Fault injection for tests (never in a config): $UTILRAG_FAULT_TRAIN_KILL_AT_STEP = "[phase:]step"."""
    value = os.environ.get("UTILRAG_FAULT_TRAIN_KILL_AT_STEP")
    if not value:
        return None
    phase, _, step = value.rpartition(":")
    return int(phase or 0), int(step)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from utilrag.train.dataset import group_file, read_groups, tokenize_batch

    tcfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(tcfg.cpus_per_worker)
    resume = {"phase": 0, "step": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = json.loads(Path(d, "state.json").read_text())
    phases = config["phases"]
    model_path = resolve_model(config["model_path"])  # a trained model's URI: this node's copy
    metrics_log = MetricsLog(config["metrics_path"], phases, resume) if rank == 0 else None
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank and every attempt
    # One engine for every phase (see train/engine.py); built with the first phase's schedule.
    model, engine = setup_model_and_engine(tcfg, model_path, phases[0]["steps"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)  # tokenises each batch here (train/dataset.py)
    clock = CheckpointClock(tcfg.checkpoint_every_s, tcfg.checkpoint_every, engine.device)
    for phase_index, phase in enumerate(phases):
        if phase_index < resume["phase"]:
            continue
        resuming = checkpoint is not None and resume["phase"] == phase_index
        start = resume["step"] if resuming else 0
        if phase_index > 0 and start > 0:
            new_phase_schedule(engine, tcfg, phase["steps"])  # its state comes from the checkpoint
        if resuming:
            with checkpoint.as_directory() as d:
                engine.load_checkpoint(d, tag="ckpt")
            if rank == 0:
                log.info(f"resumed phase {phase['name']!r} at step {start}")
        if phase_index > 0 and start == 0:  # a new phase: fresh AdamW state and schedule
            reset_optimizer_state(engine)
            new_phase_schedule(engine, tcfg, phase["steps"])
        engine.train()
        t0 = time.time()
        texts = read_groups(group_file(config["data"], phase["name"], rank), tcfg.per_device_queries)
        for step, text_batch in enumerate(texts):
            if step < start:
                continue  # already trained before the restart (same deterministic stream)
            tokens = tokenize_batch(text_batch, tokenizer, tcfg.query_max_len, tcfg.passage_max_len)
            batch = {k: torch.from_numpy(v) for k, v in tokens.items()}
            if rank == 1 and not checkpoint and _fault_kill_at() == (phase_index, step):
                # Tests only: a real worker death, once. Not at once: the controller takes a report (and
                # the checkpoint it carries) at its next poll of the workers (every 2 s), and a worker that
                # dies before then loses it; the restart would begin from the one before.
                time.sleep(6)
                os.kill(os.getpid(), signal.SIGKILL)
            torch.manual_seed(tcfg.seed * 100_003 + phase_index * 10_007 + step * 101 + rank)  # dropout
            loss = train_step(engine, batch, tcfg)
            done = step + 1
            metrics = {
                "phase": phase["name"],
                "step": done,
                "global_step": phase["offset"] + done,
                "loss": loss,
                "lr": engine.get_lr()[0],
                "queries_per_s": tcfg.per_device_queries
                * ctx.get_world_size()
                * (done - start)
                / max(time.time() - t0, 1e-9),
            }
            if metrics_log is not None:
                metrics_log.add(metrics)
                if done % 10 == 0 or done == phase["steps"]:
                    log.info(
                        f"{phase['name']} step {done}/{phase['steps']} loss {loss:.4f} "
                        f"({metrics['queries_per_s']:.1f} queries/s)"
                    )
                    try:  # what the driver prints (workers' own output is on the console at --log-level debug)
                        store.write_text(config["progress_path"], json.dumps({**metrics, "time": time.time()}))
                    except OSError as e:  # a progress line is not worth a worker restart
                        log.warning(f"progress not written: {e}")
            last = done == phase["steps"]
            save = clock.due(done) or last
            next_state = {"phase": phase_index + 1, "step": 0} if last else {"phase": phase_index, "step": done}
            if save and metrics_log is not None:
                metrics_log.flush()  # the loss log is as durable as the checkpoint it goes with
            report_metrics_and_save_checkpoint(engine, metrics, next_state, save)
            if save:
                clock.saved()
        checkpoint = None
    if checkpoint is not None:  # restarted after the last step's checkpoint: its weights, not fresh ones
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="ckpt")
    if metrics_log is not None:
        metrics_log.flush()
    target = config["model_dir"]  # the staging location: shared storage, or the object-store prefix
    if not store.is_remote(target):
        save_hf_model(engine, model, Path(target), tokenizer, rank, encoder_spec(tcfg))
        return
    with tempfile.TemporaryDirectory() as tmp:  # object storage: save locally, then upload
        save_hf_model(engine, model, Path(tmp), tokenizer, rank, encoder_spec(tcfg))
        if rank == 0:
            store.upload_dir(tmp, target)


class MetricsLog:
    """Rank 0's loss log: rows kept in memory and written whole (one PUT on object storage, which
    cannot append) at every checkpoint; a restarted run continues the rows already written."""

    def __init__(self, location: str, phases: list[dict], resume: dict):
        self.location = location
        text = store.read_text(location)
        rows = list(csv.DictReader(io.StringIO(text))) if text else []
        # Steps after the checkpoint being resumed were logged by the attempt that died: trained again now.
        done = phases[resume["phase"]]["offset"] + resume["step"] if resume["phase"] < len(phases) else None
        self.rows: list[dict] = [r for r in rows if done is None or int(r["global_step"]) <= done]

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if not self.rows:
            return
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(self.rows[-1]))
        writer.writeheader()
        writer.writerows(self.rows)
        store.write_text(self.location, out.getvalue())


# --------------------------------------------------------------------------- driver side
class TrainingProgress:
    """Rank 0's latest step (progress.json, written every 10 steps and at each phase end), printed by
    the driver while the fit runs: done/total steps over all phases, rate and ETA. Only what this fit
    wrote: a file left by an earlier attempt (a resumed run) is older than the fit."""

    def __init__(self, location: str, name: str, phases: list[dict], every_s: float = 5.0):
        self.location, self.name, self.every_s = location, name, every_s
        self.steps = {p["name"]: p["steps"] for p in phases}
        self.total = sum(self.steps.values())
        self.t0 = time.time()
        self.shown: float | None = None
        self.first: tuple[float, int] | None = None  # (time, global step) of the first step seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="train-progress", daemon=True)

    def __enter__(self) -> TrainingProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # the last line once the watcher is done (never two show() at once)
            self.show()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.show()

    def show(self) -> None:
        try:
            text = store.read_text(self.location)
            seen = json.loads(text) if text else None
        except (OSError, ValueError):
            return  # not written yet, or being replaced: the next look
        if not seen or seen["time"] < self.t0 or seen["time"] == self.shown:
            return
        self.shown = seen["time"]
        done = int(seen["global_step"])
        if self.first is None:
            self.first = (seen["time"], done)
        elapsed = seen["time"] - self.first[0]
        rate = (done - self.first[1]) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {(self.total - done) / rate:.0f}s" if rate > 0 and done < self.total else ""
        log.info(
            f"{self.name}: {seen['phase']} step {seen['step']}/{self.steps.get(seen['phase'], '?')} "
            f"({done}/{self.total} steps, "
            f"{100 * done / max(self.total, 1):.0f}%), loss {seen['loss']:.4f}, "
            f"{seen['queries_per_s']:.1f} queries/s{eta}"
        )


def plot_loss(metrics_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(metrics_csv).drop_duplicates("global_step", keep="last")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for phase, part in df.groupby("phase", sort=False):
        (line,) = ax.plot(part["global_step"], part["loss"], alpha=0.3, linewidth=1)
        window = max(1, min(10, len(part) // 5))  # per-step losses of one rank's batch are noisy
        ax.plot(
            part["global_step"],
            part["loss"].rolling(window, min_periods=1).mean(),
            color=line.get_color(),
            label=f"{phase} (mean of {window} steps)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# Settings that do not change the trained weights: a rerun that differs only in them reuses the model.
RUN_CONTROL = {"checkpoint_every_s", "checkpoint_every", "max_failures", "name", "settings"}


def run_train(cfg: PipelineConfig, tcfg: TrainConfig | None = None) -> tuple[str, bool]:
    """Fit one retriever (``tcfg``: one of ``cfg.train.runs()``; default the train section itself) into
    output_dir/train/<name>/{model/ (HF + encoder_spec.json), metrics.csv, loss.png, manifest.json};
    returns the folder and whether it was reused. Checkpoints live under ray_results/<fingerprint>,
    so a rerun with the same settings resumes and one with other settings starts afresh."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from utilrag.raycluster import connect
    from utilrag.train.dataset import build_on_a_worker

    connect(cfg.ray)
    tcfg = tcfg or cfg.train
    t0 = time.time()
    folder = Store(cfg.output_dir).train(tcfg.name)
    model_path = resolve_model(tcfg.model)  # this node's (the driver's) copy
    model_ref = model_reference(tcfg.model)  # what the workers resolve on their own nodes
    dataset = open_dataset(cfg, tcfg.dataset)
    fp = fingerprint(
        {
            "dataset": dataset.fingerprint,
            "inputs": input_fingerprints(cfg, tcfg),
            "model": model_identity(model_path),
            "train": tcfg.model_dump(exclude=RUN_CONTROL),
        }
    )
    if store.reusable(folder, fp) is not None:
        log.info(f"{tcfg.name}: inputs and settings unchanged, reusing {folder}")
        return folder, True
    # The groups of every phase, texts joined, one file per phase and worker, built by a task on a CPU
    # node (the driver holds no per-query data); under ray_results/<fingerprint>, beside the checkpoints
    # of the run that reads them. A user mistake (too few groups for one step) stops here, before the
    # old outputs are invalidated.
    results = store.join(folder, "ray_results")  # Ray Train's storage_path: a local/shared path or a URI
    data_location = store.join(results, fp, "data")
    phases = build_on_a_worker(cfg, tcfg, data_location)
    for phase in phases:
        log.info(
            f"phase {phase['name']!r}: {phase['groups']:,} groups of {tcfg.group_size} -> "
            f"{phase['steps']} steps x {tcfg.num_workers} workers x {tcfg.per_device_queries} queries"
        )
    # Inputs checked: only now are the old outputs invalidated. Checkpoints and the loss log live under
    # ray_results/<fingerprint>, which a rerun with the same settings resumes (a commit that was
    # interrupted after training included); another setting's are removed.
    writer = store.begin(folder, "train", fp)
    for old in store.list_names(results):
        if old != fp:
            store.remove(store.join(results, old))
    metrics_path = store.join(results, fp, "metrics.csv")
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "utilrag" / "torch_extensions")
        ),
        "OMP_NUM_THREADS": str(tcfg.cpus_per_worker),
    }
    if not tcfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("UTILRAG_FAULT_TRAIN_KILL_AT_STEP"):  # fault injection, set by tests only
        env["UTILRAG_FAULT_TRAIN_KILL_AT_STEP"] = os.environ["UTILRAG_FAULT_TRAIN_KILL_AT_STEP"]
    # A GPU worker still needs its CPUs (tokenised batches, the DeepSpeed step's host work):
    # reserve them so that Ray does not pack other tasks onto them.
    per_worker = {"CPU": tcfg.cpus_per_worker, **({"GPU": 1} if tcfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": tcfg.model_dump(),
            "model_path": model_ref,
            "phases": phases,
            "model_dir": writer.path("model"),
            "metrics_path": metrics_path,
            "progress_path": store.join(results, fp, "progress.json"),
            "data": data_location,
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker=per_worker,
            # labelled node types: gpu (or cpu) nodes
            label_selector=node_selector(tcfg.use_gpu) or None,  # type: ignore[call-arg]  # Ray Train v2
        ),
        run_config=RunConfig(
            name=fp,
            storage_path=results,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            worker_runtime_env={"env_vars": env},  # type: ignore[call-arg]  # Ray Train v2 RunConfig
        ),
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
    )
    with TrainingProgress(store.join(results, fp, "progress.json"), tcfg.name, phases):
        result = trainer.fit()
    if result.error:
        raise result.error
    metrics_text = store.read_text(metrics_path)
    if metrics_text:
        writer.local_path("metrics.csv").write_text(metrics_text)
        plot_loss(writer.local_path("metrics.csv"), writer.local_path("loss.png"))
    if not store.exists(writer.path("model")):
        raise UtilragError(
            f"train: the trained model did not reach {writer.path('model')}: rank 0 ran on another node, so "
            "output_dir must be shared storage (mounted on every node) or an object-store URI"
        )
    wall = time.time() - t0
    summary = TrainSummary(
        config=tcfg.model_dump(mode="json"),
        model_path=model_path,
        phases=phases,
        checkpoint=str(result.checkpoint.path) if result.checkpoint else None,
        wall_time_s=round(wall, 2),
    )
    writer.commit(**summary.manifest())
    # The groups repeat the texts per epoch (GBs at MS MARCO's scale) and only a resume reads them: a
    # committed run is reused, never resumed, so they go (checkpoints and the loss log stay).
    store.remove(data_location)
    log.info(
        f"done in {wall:.0f}s; HF model at {store.join(folder, 'model')}; loss curve {store.join(folder, 'loss.png')}"
    )
    return folder, False


def input_fingerprints(cfg: PipelineConfig, tcfg: TrainConfig) -> dict:
    """The pools (and, for LLM labels, the annotation) a training run reads."""
    from utilrag.train.dataset import labels_location

    layout = Store(cfg.output_dir)
    pools = store.require(layout.pools(tcfg.dataset, tcfg.split), f"train: pools of {tcfg.dataset}/{tcfg.split}")
    found = {"pools": pools["input_fingerprint"]}
    if tcfg.labels != "human":
        location, committed = labels_location(cfg, tcfg)
        found["labels"] = committed["input_fingerprint"] if committed else store.file_stamp(location)
    return found


def run(cfg: PipelineConfig) -> StageResult:
    """The training stage: one retriever per train setting (or the one the section describes)."""
    t0 = time.time()
    runs = cfg.train.runs()
    done = []
    for i, tcfg in enumerate(runs, 1):
        if len(runs) > 1:
            log.info(f"setting {i}/{len(runs)}: {tcfg.name} (labels {tcfg.labels})")
        done.append(run_train(cfg, tcfg))
    return StageResult("train", [f for f, _ in done], reused=sum(r for _, r in done), wall_s=time.time() - t0)
