"""A quiet console: rlrestore's messages and one bar per phase on the terminal; Ray's records and
its workers' lines in the run's log file (and on the terminal with ``--verbose``)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlrestore.orchestration.cli import build_parser
from rlrestore.orchestration.cli_tools import default_config_path
from rlrestore.runtime import console

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def log_path(tmp_path: Path):
    """A log file for the test; the console is quiet again afterwards."""
    path = console.log_to_file(tmp_path / "logs" / console.LOG_FILE)
    yield path
    console.close_log_file()
    console.configure_console(False)


@pytest.mark.parametrize("verbose", [False, True])
def test_only_rlrestore_reaches_the_terminal_unless_verbose(log_path: Path, capsys, verbose: bool) -> None:
    console.configure_console(verbose)
    console.route_ray_logging()  # as ray_session does: Ray's loggers lose their own terminal handler
    logging.getLogger("rlrestore.orchestration.jobs").info("built the shards")
    logging.getLogger("ray.train").warning("placement group cleaner: state API unavailable")
    logging.getLogger("ray.train").error("the controller died")
    console._log_worker_lines(
        {"pid": 12, "actor_name": "RayTrainWorker", "ip": "10.0.0.2", "localhost": "10.0.0.1", "is_err": True,
         "lines": ["autoencoder: 50%", "Reporting training result 1"]}
    )
    err = capsys.readouterr().err
    assert "built the shards" in err and "the controller died" in err
    assert ("placement group cleaner" in err) == verbose
    assert ("(RayTrainWorker pid=12, ip=10.0.0.2) Reporting training result 1" in err) == verbose
    text = log_path.read_text()
    for line in ("built the shards", "placement group cleaner", "the controller died",
                 "WARNING ray_workers: (RayTrainWorker pid=12, ip=10.0.0.2) autoencoder: 50%"):
        assert line in text


def test_verbose_goes_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    assert parser.parse_args(["--verbose", "plot", "runs/x"]).verbose
    assert parser.parse_args(["plot", "runs/x", "--verbose"]).verbose
    assert parser.parse_args(["data", "build", "--src", "a", "--out", "b", "--verbose"]).verbose
    assert not parser.parse_args(["plot", "runs/x"]).verbose


def test_the_driver_bar_follows_rank_zero(tmp_path: Path, capsys) -> None:
    path = console.progress_path(tmp_path, "stage1.1")
    writer = console.ProgressFile(path, steps=5, interval=3600.0)
    with console.follow_progress(path, "stage1.1", 5):
        writer.update(1, 2.0)  # the first write goes through
        writer.update(2, 1.5)  # within the interval: skipped
        writer.update(5, 0.25)  # the last step: always written
    err = capsys.readouterr().err
    assert "stage1.1: 100%" in err and "5/5" in err and "loss=0.2500" in err


def test_a_time_limited_stage_counts_seconds(tmp_path: Path, capsys) -> None:
    path = console.progress_path(tmp_path, "stage1.2")
    writer = console.ProgressFile(path, steps=10_000, interval=3600.0)
    with console.follow_progress(path, "stage1.2", 10_000, seconds=30.0):
        writer.update(1, 2.0, seconds=4.0)
        writer.update(7, 0.5, seconds=31.2, force=True)  # the limit ended it: written though within the interval
    err = capsys.readouterr().err
    assert "30/30" in err and "step=7" in err and "loss=0.5000" in err


def test_train_prints_no_worker_lines_and_logs_them(tmp_path: Path) -> None:
    """``train`` through a subprocess: the terminal has the phase bars and the summary, no
    ``pid=`` line; the run's log file has the workers' lines and names Ray's session logs."""
    run = tmp_path / "run"
    overrides = [
        f"run_dir={run}", "autoencoder.steps=2", "autoencoder.checkpoint_every=2", "data.image_size=64",
        "policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16", "ray.num_cpus=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "rlrestore", "train", "autoencoder", str(default_config_path()), *overrides]
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stdout + done.stderr
    assert "pid=" not in terminal and "Ray" not in terminal
    assert "autoencoder: 100%" in done.stderr and f"log file     : {run / 'logs' / 'rlrestore.log'}" in done.stdout
    log = (run / "logs" / "rlrestore.log").read_text()
    assert "(RayTrainWorker pid=" in log and "(TrainController pid=" in log
    assert "Ray's own logs of this session: " in log
