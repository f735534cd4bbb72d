"""The ``utilrag`` logger: ``[stage] message`` lines on stdout, ``--log-level``, and progress that
is a tqdm bar on a terminal and one line per update otherwise (logs of cluster jobs, CI)."""

from __future__ import annotations

import logging
import sys
import time

ROOT = "utilrag"


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = record.name.split(".", 1)[1] if "." in record.name else ROOT
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"[{stage}] {prefix}{record.getMessage()}"


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest's capture, a redirected job log)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never take a stage down
            self.handleError(record)


def setup_logging(level: str | int = "INFO") -> None:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(_StageFormatter())
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper() if isinstance(level, str) else level)


def start_run_log(output_dir: str, command: str) -> logging.FileHandler:
    """This command's log file: every ``[stage]`` line with its time, and the warnings of the libraries
    this process loads (Python warnings, other loggers at WARNING and above), which then stay off the
    console. Under ``<output_dir>/logs/`` for a local run directory, else (object storage) under the
    local cache ``$UTILRAG_CACHE/logs/<run directory>/``. Returns its handler (``baseFilename``: the path,
    named at the end of a run); ``stop_run_log`` closes it."""
    import os

    from utilrag import store
    from utilrag.paths import cache_dir

    output_dir = store.normalize(output_dir)  # ~ expanded, as the stages write it
    folder = (
        os.path.join(cache_dir(), "logs", store.slug(output_dir))
        if store.is_remote(output_dir)
        else os.path.join(output_dir, "logs")
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{time.strftime('%Y%m%d-%H%M%S')}-{command}.log")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger(ROOT).addHandler(handler)  # ours (they do not propagate: the console has them once)
    logging.getLogger().addHandler(handler)  # the root logger: other libraries' warnings (its level: WARNING)
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger -> this file
    return handler


def stop_run_log(handler: logging.FileHandler) -> None:
    """The command's log file closed; a later command in this process writes its own."""
    for logger in (logging.getLogger(ROOT), logging.getLogger()):
        logger.removeHandler(handler)
    logging.captureWarnings(False)
    handler.close()


def get_logger(stage: str) -> logging.Logger:
    """The stage's logger; usable from library code and Ray workers without any setup."""
    if not logging.getLogger(ROOT).handlers:
        setup_logging()
    return logging.getLogger(f"{ROOT}.{stage}")


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Progress:
    """``with Progress(log, "encoding", total) as p: p.update(n)`` — a bar on a TTY, else a line
    at most every ``every_s`` seconds (and at the end)."""

    def __init__(self, log: logging.Logger, what: str, total: int | None, unit: str = "it", every_s: float = 10.0):
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.done, self.t0, self._last = 0, time.time(), 0.0
        self._bar = None
        if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"[{log.name.split('.')[-1]}] {what}", unit=unit, leave=False)

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.time() - self._last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self._last = time.time()
        rate = self.done / max(self._last - self.t0, 1e-9)
        of = f"/{self.total:,}" if self.total is not None else ""
        eta = ""
        if self.total is not None and 0 < self.done < self.total and rate > 0:
            eta = f", ETA {clock((self.total - self.done) / rate)}"
        self.log.info(f"{self.what}: {self.done:,}{of} {self.unit} ({rate:,.1f}/s{eta})")

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        if exc[0] is None:
            self._line()
