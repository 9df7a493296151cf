"""The console and the run's log file.

The terminal shows rlrestore's own messages, one progress bar per phase and the final summary.
Everything else goes to the run's log file (``<run_dir>/logs/rlrestore.log`` for training and the
demo, ``OUT/rlrestore.log`` for ``eval``/``analyze``): Ray's own log records, its warnings (the
placement-group cleaner's among them) and every line a Ray worker or actor prints, prefixed as
Ray prints them, ``(RayTrainWorker pid=123) ...``. ``rlrestore --verbose`` shows all of it on the
terminal as well. Ray keeps its own copy of worker output under ``<session_dir>/logs``; the log
file names that folder.

Progress of a Ray Train job reaches the terminal as one bar drawn by the driver: rank 0 records
its step in a small file in the run directory (:class:`ProgressFile`) and the driver follows it
(:func:`follow_progress`); no worker draws a bar of its own.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm import tqdm

LOG_FILE = "rlrestore.log"
# Loggers whose INFO records reach the terminal; any other logger's only from ERROR up.
CONSOLE_PACKAGES = ("rlrestore", "trainers", "rollouts", "rewards", "__main__")
WORKER_LOGGER = "ray_workers"  # the lines Ray's workers and actors print (not under "ray": see route_ray_logging)
_HANDLER_NAME = "rlrestore_run_log"
FILE_ONLY = {"console": False}  # log.info(..., extra=FILE_ONLY): the log file, not the terminal


class _Console:
    verbose = False
    stream: logging.Handler | None = None
    file: logging.FileHandler | None = None


def _on_console(record: logging.LogRecord) -> bool:
    """``--verbose``: everything; else errors, and rlrestore's own records unless logged with
    ``extra=FILE_ONLY`` (details such as each worker's device)."""
    if _Console.verbose or record.levelno >= logging.ERROR:
        return True
    return record.name.split(".", 1)[0] in CONSOLE_PACKAGES and getattr(record, "console", True)


def configure_console(verbose: bool = False) -> None:
    """INFO logs to the current ``sys.stderr`` (only rlrestore's, unless ``verbose``); a later call
    (notebooks, tests) replaces the handler of an earlier one instead of adding another."""
    root = logging.getLogger()
    if _Console.stream is not None:
        root.removeHandler(_Console.stream)
    _Console.verbose = verbose
    _Console.stream = logging.StreamHandler(sys.stderr)
    _Console.stream.setFormatter(logging.Formatter("%(message)s"))
    _Console.stream.addFilter(_on_console)
    root.addHandler(_Console.stream)
    root.setLevel(logging.INFO)


def is_verbose() -> bool:
    """Whether ``--verbose`` asked for every log line on the terminal."""
    return _Console.verbose


class _FolderMakingFileHandler(logging.FileHandler):
    """Opens (and makes the folder of) its file at the first record: a command refused before it
    logs anything leaves no run directory behind."""

    def _open(self) -> io.TextIOWrapper:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_to_file(path: str | Path) -> Path:
    """Send every log record (all loggers, INFO and up) to ``path`` as well, from its first record
    on, replacing an earlier log file of this process; returns the path."""
    path = Path(path)
    close_log_file()
    root = logging.getLogger()
    _Console.file = _FolderMakingFileHandler(path, encoding="utf-8", delay=True)
    _Console.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(_Console.file)
    root.setLevel(logging.INFO)
    return path


def close_log_file() -> None:
    """Stop logging to the log file (the end of a command)."""
    if _Console.file is not None:
        logging.getLogger().removeHandler(_Console.file)
        _Console.file.close()
        _Console.file = None


def route_ray_logging() -> None:
    """Ray's driver-side loggers (configured by ``import ray`` with their own terminal handler)
    propagate to the root logger instead: to the log file, and to the terminal with ``--verbose``."""
    import ray  # noqa: F401 - its import configures the "ray" logger

    route_logger("ray")


def route_logger(name: str) -> logging.Logger:
    """A library logger that prints to the terminal itself (Ray, DeepSpeed, pyiqa) loses its handlers
    and propagates to the root logger: the log file, and the terminal only as configured here."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    return logger


def import_quietly(name: str, loggers: Sequence[str] = ()) -> ModuleType:
    """Import ``name`` with what its import prints (DeepSpeed: "Setting accelerator to CPU" on
    stdout) logged instead; its ``loggers``, which print to the terminal themselves, then
    propagate to the root logger like any other (the log file; the terminal with ``--verbose``)."""
    if name in sys.modules:
        return sys.modules[name]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        module = importlib.import_module(name)
    for logger_name in loggers:
        route_logger(logger_name)
    for line in printed.getvalue().splitlines():
        if line.strip():
            logging.getLogger(name).info(line)
    return module


def capture_worker_output() -> None:
    """After ``ray.init(log_to_driver=True)``: every line a worker or actor prints is logged to
    ``WORKER_LOGGER`` (the log file); the terminal keeps Ray's own printing only with ``--verbose``."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not _Console.verbose:
        dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler(_HANDLER_NAME)
    dispatcher.add_handler(_HANDLER_NAME, _log_worker_lines)


def _log_worker_lines(data: dict[str, Any]) -> None:
    """One log record per printed line, prefixed as Ray prints it: ``(Name pid=1, ip=...) line``."""
    logger = logging.getLogger(WORKER_LOGGER)
    name = data.get("actor_name") or data.get("task_name") or ""
    ip = data.get("ip")
    where = f"{name} pid={data.get('pid')}".strip() + ("" if ip == data.get("localhost") else f", ip={ip}")
    level = logging.WARNING if data.get("is_err") else logging.INFO
    for line in data.get("lines", []):
        logger.log(level, "(%s) %s", where, line)


def progress_path(run_dir: str | Path, stage: str) -> Path:
    """Where rank 0 of a Ray Train job records its step for the driver's progress bar."""
    return Path(run_dir) / "logs" / stage / "progress.json"


class ProgressFile:
    """Rank 0's side of the driver's progress bar: the step, loss and seconds of steps so far,
    rewritten atomically at most every ``interval`` seconds (and always at the last step). The run directory is shared by the
    driver and the workers, as it is for checkpoints."""

    def __init__(self, path: Path, steps: int, interval: float = 0.5) -> None:
        self.path, self.steps, self.interval = path, steps, interval
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._written = 0.0

    def update(self, step: int, loss: float, seconds: float = 0.0, force: bool = False) -> None:
        """Record that ``step`` steps are done (``loss``: the last step's; ``seconds``: the time of the
        steps; ``force``: write now, the stage ends here)."""
        now = time.monotonic()
        if step < self.steps and not force and now - self._written < self.interval:
            return
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps({"step": step, "steps": self.steps, "loss": loss, "seconds": seconds}))
        os.replace(temporary, self.path)
        self._written = now


@contextlib.contextmanager
def follow_progress(
    path: Path, stage: str, steps: int, enabled: bool = True, seconds: float | None = None
) -> Iterator[None]:
    """The driver's one progress bar of a Ray Train job: a thread follows ``path`` (written by
    :class:`ProgressFile` on rank 0) while the body runs. ``seconds``: a stage with a wall-clock
    limit counts seconds of steps up to it (the step shown beside), not steps."""
    path.unlink(missing_ok=True)
    if not enabled:
        yield
        return
    if seconds is None:
        bar = tqdm(total=steps, desc=stage, mininterval=1.0)
    else:
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s of steps [{elapsed}{postfix}]"
        bar = tqdm(total=round(seconds), desc=stage, bar_format=bar_format, mininterval=1.0)
    done = threading.Event()

    def follow() -> None:
        while not done.wait(0.5):
            _show(path, bar, seconds is not None)

    thread = threading.Thread(target=follow, name=f"progress-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        _show(path, bar, seconds is not None)
        bar.close()


def _show(path: Path, bar: tqdm, by_seconds: bool) -> None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return
    if by_seconds:
        bar.update(min(round(state.get("seconds", 0.0)), bar.total) - bar.n)
        bar.set_postfix(step=state["step"], loss=f"{state['loss']:.4f}", refresh=False)
    else:
        bar.update(state["step"] - bar.n)
        bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)
