"""Local Parquet metrics (resume, union schema, SIGKILL), the secret-free W&B wrapper, run plots."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlrestore.orchestration.plotting import plot_run
from rlrestore.tracking import RUN_ID_FILE, MetricsWriter, WandbRun, read_metrics, scrub, secret_values

REPO = Path(__file__).resolve().parents[1]
SECRET = "wandb-secret-5c1e0f7b-not-a-real-key-93a1"


def test_resumed_session_overrides_redone_steps_and_columns_union(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, "stage2", flush_every=2) as writer:
        writer.log({"loss": 1.0, "reward": 0.1}, step=0)
        writer.log({"loss": 0.9}, step=1)  # first part flushed here
        writer.log({"timing/rollout": 4.0}, step=1)  # same step, same session: merged
        writer.log({"loss": 0.8, "timing/train": 2.5}, step=2)  # flushed on close
    with MetricsWriter(tmp_path, "stage2") as writer:  # a resumed run redoes step 2
        writer.log({"loss": 0.7, "kl": np.float32(0.25)}, step=2)
        writer.log({"loss": torch.tensor(0.6), "reward": 3, "skipped": True}, step=3)

    metrics = read_metrics(tmp_path, "stage2")
    assert list(metrics.columns[:2]) == ["step", "time"]
    assert set(metrics.columns) == {
        "step",
        "time",
        "loss",
        "reward",
        "timing/rollout",
        "timing/train",
        "kl",
        "skipped",
    }
    assert metrics["step"].tolist() == [0, 1, 2, 3]
    assert metrics["loss"].tolist() == pytest.approx([1.0, 0.9, 0.7, 0.6])
    assert metrics["timing/rollout"][1] == 4.0
    assert math.isnan(metrics["reward"][1]) and metrics["reward"][3] == 3 and metrics["skipped"][3] == 1
    assert math.isnan(metrics["timing/train"][2])  # the redone row replaced the first one whole
    assert metrics["kl"][2] == pytest.approx(0.25)
    assert metrics["time"].is_monotonic_increasing
    parts = sorted(p.name for p in (tmp_path / "metrics" / "stage2").iterdir())
    assert len(parts) == 3 and all(p.startswith("part-") and p.endswith(".parquet") for p in parts)


def test_writer_validates_rows(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, "stage1") as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.log({"step": 3.0}, step=3)
        with pytest.raises(TypeError, match="'note' must be a number"):
            writer.log({"note": "hello"}, step=3)
        with pytest.raises(ValueError, match="non-negative integer"):
            writer.log({"loss": 1.0}, step=-1)
    with pytest.raises(RuntimeError, match="closed"):
        writer.log({"loss": 1.0}, step=4)
    with pytest.raises(ValueError, match="plain directory name"):
        MetricsWriter(tmp_path, "../elsewhere")


def test_reading_a_stage_without_metrics_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metrics" / "stage1")):
        read_metrics(tmp_path, "stage1")


def test_sigkilled_writer_leaves_readable_parts(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import itertools, sys
        from rlrestore.tracking import MetricsWriter
        writer = MetricsWriter({str(tmp_path)!r}, "stage2", flush_every=1)
        for step in itertools.count():
            writer.log({{"loss": 1.0 / (step + 1), "wide": float(step) * 1e6}}, step=step)
            if step == 20:
                print("ready", flush=True)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    metrics = read_metrics(tmp_path, "stage2")
    steps = metrics["step"].tolist()
    assert len(steps) > 20 and steps == list(range(len(steps)))  # every flushed row, in order
    assert metrics["loss"].tolist() == pytest.approx([1.0 / (s + 1) for s in steps])


def test_secret_values_and_scrub(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {
        "WANDB_API_KEY": SECRET,
        "HF_TOKEN": "hf_abcdefghijklmnop",
        "DB_PASSWORD": "correct-horse",
        "TOKENIZERS_PARALLELISM": "false",
        "HOME": "/home/someone",
    }
    found = secret_values(environ)
    assert set(found) == {SECRET, "hf_abcdefghijklmnop", "correct-horse"}
    config = {"key": SECRET, "url": f"https://u:{SECRET}@host", "list": ["hf_abcdefghijklmnop", 3], "n": 1.5}
    assert scrub(config, found) == {"key": "***", "url": "https://u:***@host", "list": ["***", 3], "n": 1.5}


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every W&B file (cache, config, logs) under tmp_path; put a unique secret in the env."""
    home = tmp_path / "home"
    for name, sub in (
        ("WANDB_DIR", "wandb_dir"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
        ("XDG_CACHE_HOME", "xdg_cache"),
        ("XDG_CONFIG_HOME", "xdg_config"),
    ):
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    for name in ("WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_offline_run_writes_no_secret_and_resumes_the_same_run(tmp_path: Path, wandb_env: Path) -> None:
    run_dir = tmp_path / "run"
    config = {"lr": 3e-4, "wandb": {"api_key": SECRET}, "note": f"key={SECRET}"}
    with WandbRun(run_dir=run_dir, mode="offline", name="nft-test", config=config) as run:
        run.log({"reward/mean": 0.5, "loss": 1.25}, step=1)
        image = Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8))
        run.log_images("samples", [image, np.zeros((16, 16, 3), np.uint8)], step=1, captions=[SECRET, "b"])
        first_id = run.run_id
    assert (run_dir / RUN_ID_FILE).read_text().strip() == first_id
    assert any((run_dir / "wandb").glob(f"offline-run-*-{first_id}/run-{first_id}.wandb"))

    resumed = WandbRun(run_dir=run_dir, mode="offline", config=config)
    resumed.log({"loss": 1.0}, step=2)
    resumed.finish()
    resumed.finish()
    assert resumed.run_id == first_id

    files = [p for root in (run_dir, wandb_env) for p in root.rglob("*") if p.is_file()]
    assert len(files) > 3
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def test_explicit_resume_id_wins(tmp_path: Path, wandb_env: Path) -> None:
    run = WandbRun(run_dir=tmp_path / "run", mode="offline", resume_id="abc12345")
    run.finish()
    assert run.run_id == "abc12345"
    assert (tmp_path / "run" / RUN_ID_FILE).read_text().strip() == "abc12345"


def test_disabled_run_writes_nothing_and_online_needs_a_key(
    tmp_path: Path, wandb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = WandbRun(run_dir=tmp_path / "run", mode="disabled", config={"a": 1})
    run.log({"loss": 1.0}, step=0)
    run.finish()
    assert list((tmp_path / "run").iterdir()) == []
    monkeypatch.delenv("WANDB_API_KEY")
    with pytest.raises(RuntimeError, match="WANDB_API_KEY"):
        WandbRun(run_dir=tmp_path / "run", mode="online")


def test_plot_run_draws_each_stage(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, "stage1_1") as writer:
        for step in range(3):
            writer.log({"loss": 1.0 / (step + 1)}, step=step)
    rng = np.random.default_rng(0)
    with MetricsWriter(tmp_path, "stage2") as writer:
        for step in range(60):
            writer.log({"reward": step / 60 + rng.normal(0, 0.1), "old_deviation": 0.01}, step=step)
        writer.log({"reward": float("nan")}, step=60)

    paths = plot_run(tmp_path)
    assert paths == [tmp_path / "plots" / "stage1_1.png", tmp_path / "plots" / "stage2.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert plot_run(tmp_path, out_dir=tmp_path / "elsewhere")[0].parent == tmp_path / "elsewhere"


def test_plot_run_without_metrics_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no metrics to plot"):
        plot_run(tmp_path)


def test_a_run_id_held_by_a_killed_run_is_waited_for_then_replaced(
    tmp_path: Path, wandb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from rlrestore import tracking

    real_init, tried = wandb.init, []

    def held(holder_ids: set[str]):
        def init(*args, **kwargs):
            tried.append(kwargs["id"])
            if kwargs["id"] in holder_ids:
                raise RuntimeError(f"run ID {kwargs['id']} is in use")
            return real_init(*args, **kwargs)

        return init

    (tmp_path / RUN_ID_FILE).write_text("heldid01\n")
    monkeypatch.setattr(tracking, "RUN_ID_WAIT_S", 0.0)
    monkeypatch.setattr(wandb, "init", held({"heldid01"}))
    with WandbRun(run_dir=tmp_path, mode="offline", project="p") as run:
        assert run.run_id != "heldid01"
    assert tried[0] == "heldid01" and tried[-1] == run.run_id
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == run.run_id  # later resumes use the new id

    def fails(*args, **kwargs):
        raise ValueError("bad")

    monkeypatch.setattr(wandb, "init", fails)
    with pytest.raises(ValueError, match="bad"):  # other errors are not swallowed
        WandbRun(run_dir=tmp_path / "other", mode="offline", project="p")
