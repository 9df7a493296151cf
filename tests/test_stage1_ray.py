"""Stage 1.1 + 1.2 as Ray Train jobs on 2 workers: the loss falls, and an interrupted run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from rlrestore.checkpoints import list_checkpoints
from rlrestore.orchestration.jobs import run_stage1
from rlrestore.tracking import read_metrics
from tests.conftest import TINY_CONFIG, tiny_config

pytestmark = pytest.mark.slow


def _early_late(frame: pd.DataFrame, column: str, n: int = 4) -> tuple[float, float]:
    values = frame.sort_values("step")[column].to_numpy()
    return float(values[:n].mean()), float(values[-n:].mean())


def test_stage1_on_two_workers_lowers_the_loss(tmp_path: Path, ray_cluster) -> None:
    config = tiny_config(
        tmp_path / "run",
        "ray.train_workers.num_actors=2",
        "stage1_1.steps=16",
        "stage1_1.checkpoint_every=8",
        "stage1_2.steps=16",
        "stage1_2.checkpoint_every=8",
    )
    run_stage1(config, "stage1.1")
    run_stage1(config.model_copy(update={"precision": "bf16-mixed"}), "stage1.2")  # autocast under DDP

    for stage in ("stage1.1", "stage1.2"):
        frame = read_metrics(tmp_path / "run", stage)
        assert frame["step"].tolist() == list(range(16)), stage
        early, late = _early_late(frame, "loss")
        assert late < 0.9 * early, f"{stage}: loss {early:.4f} -> {late:.4f} did not fall"
        assert [step for step, _ in list_checkpoints(tmp_path / "run", stage)] == [8, 16]
    ce_early, ce_late = _early_late(read_metrics(tmp_path / "run", "stage1.1"), "ce_loss")
    assert ce_late < ce_early
    # Stage 1.2 started from the end of Stage 1.1 and W&B wrote offline runs for both stages.
    assert (tmp_path / "run" / "logs" / "stage1.2" / "wandb").is_dir()
    assert (tmp_path / "run" / "config.yaml").is_file()
    # Rank 0 wrote every worker's device record, per stage.
    records = json.loads((tmp_path / "run" / "devices.json").read_text())
    assert [(r["stage"], r["actor"]) for r in records] == [
        ("stage1.1", "rank 0"), ("stage1.1", "rank 1"), ("stage1.2", "rank 0"), ("stage1.2", "rank 1"),
    ]  # fmt: skip
    assert {(r["role"], r["device"], r["dtype"]) for r in records} == {("worker", "cpu", "float32")}
    assert [(r["precision"], r["autocast"]) for r in records] == [("fp32", None)] * 2 + [("bf16-mixed", "bfloat16")] * 2
    assert all(r["node"] for r in records)


def _train_command(run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "rlrestore", "train", "stage1.1", str(TINY_CONFIG),
        f"run_dir={run_dir}", f"stage1_1.steps={steps}", "stage1_1.checkpoint_every=4",
        "stage1_1.keep_checkpoints=10", "ray.num_cpus=2", "logging.progress=false",
    ]  # fmt: skip


def _session_first_steps(run_dir: Path, stage: str = "stage1.1") -> list[int]:
    """First step logged by each writer session (a part file name carries its session)."""
    firsts: dict[str, int] = {}
    for part in sorted((run_dir / "metrics" / stage).glob("part-*.parquet")):
        session = "-".join(part.stem.split("-")[-3:-1])  # part-<time>-<pid>-<token>-<seq>
        first = int(pq.read_table(part, columns=["step"]).column("step").to_pylist()[0])
        firsts[session] = min(first, firsts.get(session, first))
    return sorted(firsts.values())


def test_interrupted_stage1_resumes_without_repeating_steps(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    steps = 40
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    others = set(_train_worker_pids())  # Train workers of other sessions on this machine are not ours
    proc = subprocess.Popen(
        _train_command(run_dir, steps), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while not any(step >= 8 for step, _ in list_checkpoints(run_dir, "stage1.1")):
            assert proc.poll() is None, "training exited before it could be interrupted"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The driver's Ray processes fate-share with it but die asynchronously; a worker still alive
    # could finish one more checkpoint, so wait until none is left before reading the latest.
    while set(_train_worker_pids()) - others:
        assert time.monotonic() < deadline + 60, "Ray Train workers outlived their killed driver"
        time.sleep(0.5)
    interrupted_at = max(step for step, _ in list_checkpoints(run_dir, "stage1.1"))
    assert interrupted_at < steps

    rerun = subprocess.run(
        _train_command(run_dir, steps), check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    frame = read_metrics(run_dir, "stage1.1")
    assert frame["step"].tolist() == list(range(steps))
    firsts = _session_first_steps(run_dir)
    assert firsts[0] == 0
    # The second session started exactly at the newest checkpoint: nothing finished was redone.
    assert firsts[-1] == interrupted_at
    assert list_checkpoints(run_dir, "stage1.1")[-1][0] == steps


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray sets their process title)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline:
            pids.append(proc.pid)
    return pids


def test_stage1_survives_a_killed_worker(tmp_path: Path, ray_cluster) -> None:
    import threading

    steps = 40
    config = tiny_config(
        tmp_path / "run",
        f"stage1_1.steps={steps}",
        "stage1_1.checkpoint_every=4",
        "stage1_1.keep_checkpoints=20",
        "ray.max_failures=2",
    )
    errors: list[BaseException] = []

    def train() -> None:
        try:
            run_stage1(config, "stage1.1")
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 300
    while not any(step >= 8 for step, _ in list_checkpoints(tmp_path / "run", "stage1.1")):
        assert thread.is_alive(), f"training ended early: {errors}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    victims = _train_worker_pids()
    assert victims, "found no Ray Train worker process to kill"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors

    frame = read_metrics(tmp_path / "run", "stage1.1")
    assert frame["step"].tolist() == list(range(steps))
    assert list_checkpoints(tmp_path / "run", "stage1.1")[-1][0] == steps
    assert len(_session_first_steps(tmp_path / "run")) >= 2, "the worker group was not restarted"


def test_max_seconds_stops_every_worker_at_the_same_step(tmp_path: Path, ray_cluster) -> None:
    limited = (
        "ray.train_workers.num_actors=2", "stage1_1.steps=100000", "stage1_1.checkpoint_every=100000",
        "stage1_1.max_seconds=2",
    )  # fmt: skip
    ended = run_stage1(tiny_config(tmp_path / "run", *limited), "stage1.1")
    assert ended is not None and ended.timed_out
    assert 1 <= ended.step < 100000 and ended.seconds >= 2
    # The step where time ran out is checkpointed (though not a checkpoint_every step), and every
    # step before it was logged once.
    assert [step for step, _ in list_checkpoints(tmp_path / "run", "stage1.1")] == [ended.step]
    assert read_metrics(tmp_path / "run", "stage1.1")["step"].tolist() == list(range(ended.step))
    assert json.loads((ended.checkpoint / "step_summary.json").read_text())["timed_out"] is True

    # A larger budget continues from there (the seconds live in the trainer state), and `steps`
    # still ends a stage that reaches it first.
    more = run_stage1(tiny_config(tmp_path / "run", *limited[:2], f"stage1_1.steps={ended.step + 2}",
                                  "stage1_1.max_seconds=100000"), "stage1.1")  # fmt: skip
    assert (more.step, more.timed_out) == (ended.step + 2, False)
    assert more.seconds > ended.seconds
