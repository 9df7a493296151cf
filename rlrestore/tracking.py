"""Run metrics: crash-safe local Parquet parts, and a Weights & Biases run that never leaks secrets.

Every stage writes its per-step metrics under ``<run_dir>/metrics/<stage>/`` as small, complete
Parquet files, so a run killed with SIGKILL loses at most the rows it had not flushed yet, and a
resumed run that redoes a step overrides the earlier row when read back. W&B is optional on top:
offline by default (``wandb sync`` uploads later), with the API key read only from the environment.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

Number = int | float
WandbMode = Literal["offline", "online", "disabled"]

_RESERVED = ("step", "time")
_PART_GLOB = "part-*.parquet"
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_REDACTED = "***"
_MIN_SECRET_LEN = 8
RUN_ID_FILE = "wandb_run_id.txt"
RUN_ID_WAIT_S = 30.0  # how long a W&B run id held by a killed run's process is waited for

log = logging.getLogger(__name__)


def metrics_dir(run_dir: Path, stage: str) -> Path:
    """Directory holding the Parquet parts of one stage's metrics."""
    if not stage or Path(stage).name != stage or stage.startswith("."):
        raise ValueError(f"stage must be a plain directory name, got {stage!r}")
    return Path(run_dir) / "metrics" / stage


class MetricsWriter:
    """Buffer per-step scalar metrics and flush them as atomic Parquet parts.

    Each flush writes ``part-<UTC time>-<pid>-<session>-<seq>.parquet`` through a temporary
    name and ``os.replace``, so readers only ever see complete files and a SIGKILL loses only
    the rows not yet flushed. Rows may carry different metric names; a part holds the union of
    its rows' columns (missing values are null). Logging one step several times in a session
    (say losses, then timings) yields one row when read back.
    """

    def __init__(self, run_dir: Path, stage: str, flush_every: int = 50) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.directory = metrics_dir(run_dir, stage)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._rows: list[dict[str, Number]] = []
        self._session = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._parts_written = 0
        self._closed = False

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one row: ``metrics`` (name -> number) at ``step``, stamped with the wall time."""
        if self._closed:
            raise RuntimeError(f"MetricsWriter for {self.directory} is closed")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        row: dict[str, Number] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved (the writer sets 'step' and 'time')")
            row[name] = _scalar(name, value)
        self._rows.append(row)
        if len(self._rows) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one new part file (nothing if the buffer is empty)."""
        if not self._rows:
            return
        columns = list(dict.fromkeys(name for row in self._rows for name in row))
        table = pa.table({name: [row.get(name) for row in self._rows] for name in columns})
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{self._session}-{self._parts_written:06d}.parquet"
        tmp = self.directory / f".{name}.tmp"
        with open(tmp, "wb") as sink:
            pq.write_table(table, sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, self.directory / name)
        self._parts_written += 1
        self._rows.clear()

    def close(self) -> None:
        """Flush what is buffered; further ``log`` calls raise."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _scalar(name: str, value: Any) -> Number:
    """A plain Python number from an int/float, a numpy scalar or a one-element tensor (bool -> 0/1)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Number):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (ValueError, RuntimeError) as error:
            raise TypeError(f"metric {name!r} must be a single number, got {value!r}") from error
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, Number):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}: {value!r}")
    return value


def read_metrics(run_dir: Path, stage: str) -> pd.DataFrame:
    """All metrics of one stage, one row per step sorted by step.

    Rows of one step logged within one writer session merge column by column (later values
    win). When several sessions hold the same step (a resumed run redid it), the row of the
    session written last replaces the earlier one whole.
    """
    directory = metrics_dir(run_dir, stage)
    parts = sorted(directory.glob(_PART_GLOB)) if directory.is_dir() else []
    if not parts:
        raise FileNotFoundError(
            f"no metrics for stage {stage!r}: {directory} holds no {_PART_GLOB} files "
            "(has this stage run with this run_dir?)"
        )
    sessions: dict[str, int] = {}  # session -> rank of its first part in write order
    frames = []
    for part in parts:  # names start with the UTC time of the flush: sorted = written order
        session = "-".join(part.stem.split("-")[2:-1])
        frame = pq.read_table(part).to_pandas()
        frames.append(frame.assign(_session=sessions.setdefault(session, len(sessions))))
    rows = pd.concat(frames, ignore_index=True)
    merged = rows.groupby(["_session", "step"], sort=True).last().reset_index()
    latest = merged.drop_duplicates(subset="step", keep="last").sort_values("step", kind="stable")
    return latest.drop(columns="_session").reset_index(drop=True)


def metric_stages(run_dir: Path) -> list[str]:
    """Names of the stages that have metrics under ``run_dir``."""
    root = Path(run_dir) / "metrics"
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob(_PART_GLOB)))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables that look like credentials (WANDB_API_KEY and any name
    containing KEY, TOKEN, SECRET or PASSWORD), longest first.

    Values shorter than 8 characters are flags, not credentials (``TOKENIZERS_PARALLELISM=false``),
    and are left alone so that scrubbing does not mangle ordinary config strings.
    """
    environ = os.environ if environ is None else environ
    values = {
        value
        for name, value in environ.items()
        if (name == "WANDB_API_KEY" or _SECRET_NAME.search(name)) and len(value) >= _MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)


def scrub(value: Any, secrets: Sequence[str]) -> Any:
    """Copy of a config value with every occurrence of a secret replaced by ``***``."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, _REDACTED)
        return value
    if isinstance(value, Mapping):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, secrets) for v in value)
    if isinstance(value, Path):
        return Path(scrub(str(value), secrets))
    return value


class WandbRun:
    """A W&B run bound to ``run_dir``: offline by default, resumable, silent, secret-free.

    The run id is kept in ``<run_dir>/wandb_run_id.txt`` so a resumed run continues the same W&B
    run; offline files go to ``<run_dir>/wandb``. The API key is read by wandb from
    ``WANDB_API_KEY`` only; config values and captions are scrubbed of every secret-looking
    environment value (see :func:`secret_values`) before wandb sees them.
    """

    def __init__(
        self,
        *,
        run_dir: Path,
        mode: WandbMode = "offline",
        project: str = "rlrestore",
        entity: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_id: str | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"W&B mode must be 'offline', 'online' or 'disabled', got {mode!r}")
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise RuntimeError(
                "W&B mode 'online' needs an API key: set WANDB_API_KEY in the environment of every "
                "process that logs, or use mode 'offline' and upload later with `wandb sync`"
            )
        import wandb  # imported here: only processes that talk to W&B pay for it

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._secrets = secret_values()
        run_id = resume_id or self._stored_run_id() or _new_run_id()
        self._wandb = wandb
        options = {
            "project": project,
            "entity": entity,
            "name": name,
            "resume": "allow",
            "dir": self.run_dir,
            "mode": mode,
            "config": scrub(dict(config or {}), self._secrets),
            "settings": wandb.Settings(silent=True, show_info=False, console="off", save_code=False),
        }
        self._run = self._init_run(run_id, mode, options)
        self._finished = False

    def _init_run(self, run_id: str, mode: str, options: dict[str, Any]) -> Any:
        """``wandb.init`` under ``run_id``. A run killed moments ago can leave its W&B process holding
        the id ("run ID ... is in use") for a while: wait up to ``RUN_ID_WAIT_S`` for it to let go,
        then log this session under a new id (recorded for later resumes) with a warning; the
        Parquet metrics are one table either way."""
        deadline = time.monotonic() + RUN_ID_WAIT_S
        while True:
            if mode != "disabled":
                (self.run_dir / RUN_ID_FILE).write_text(run_id + "\n")
            try:
                return self._wandb.init(id=run_id, **options)
            except Exception as exc:  # wandb's ServerResponseError lives in a private module
                if "is in use" not in str(exc):
                    raise
                if time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                fresh = _new_run_id()
                log.warning(
                    "W&B run id %s is still held by an earlier process (%s); logging as %s",
                    run_id,
                    exc,
                    fresh,
                )
                run_id, deadline = fresh, math.inf

    def _stored_run_id(self) -> str | None:
        path = self.run_dir / RUN_ID_FILE
        if not path.is_file():
            return None
        return path.read_text().strip() or None

    @property
    def run_id(self) -> str:
        """The W&B run id (stable across resumes of the same run_dir)."""
        return self._run.id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars at ``step`` (W&B drops steps lower than one already logged)."""
        self._run.log(scrub(dict(metrics), self._secrets), step=step)

    def log_images(
        self,
        name: str,
        images: Sequence[Any],
        step: int,
        captions: Sequence[str] | None = None,
    ) -> None:
        """Log a list of PIL images or HWC arrays under one key, with optional captions."""
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions for {name!r}")
        captions = [None] * len(images) if captions is None else [scrub(c, self._secrets) for c in captions]
        logged = [self._wandb.Image(_image(name, im), caption=c) for im, c in zip(images, captions)]
        self._run.log({name: logged}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run and write its files; safe to call twice."""
        if not self._finished:
            self._run.finish(exit_code=exit_code)
            self._finished = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _new_run_id() -> str:
    """A fresh W&B-style run id: 8 random lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _image(name: str, image: Any) -> Any:
    """Accept a PIL image or a numpy array (HW or HWC, uint8 or float in [0, 1])."""
    if isinstance(image, (Image.Image, np.ndarray)):
        return image
    raise TypeError(f"images for {name!r} must be PIL images or numpy arrays, got {type(image).__name__}")
