"""Orchestration: the Ray session, the training data, and the Stage 1 Ray Train jobs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlrestore.checkpoints import STEP_SUMMARY, latest_checkpoint
from rlrestore.config import RayConfig, RunConfig, StageName, save_config
from rlrestore.data import build_shards, embedded_faces_dir, read_shards, split_holdout, square_resize
from rlrestore.data.shards import check_shards, read_manifest
from rlrestore.policies.registry import check_stage
from rlrestore.runtime.console import (
    WORKER_LOGGER,
    capture_worker_output,
    follow_progress,
    progress_path,
    route_ray_logging,
)
from rlrestore.runtime.devices import check_run_devices

log = logging.getLogger(__name__)

# Never reach for a hub from a worker: weights come from local paths or the HF cache only.
# No Hugging Face progress bars ("Loading weights", "Writing model shards") in worker output.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# Not WANDB_API_KEY: a runtime env is shown by the dashboard and the state API. Workers of a local
# cluster inherit it from the driver's environment; on a shared cluster the operator sets it on
# the nodes (a Kubernetes Secret, the Slurm job's environment).
PASSED_ENV = ("HF_HOME", "TORCH_HOME", "WANDB_MODE", "WANDB_DIR", "CUDA_VISIBLE_DEVICES")


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker gets."""
    env = dict(WORKER_ENV)
    env.update({name: os.environ[name] for name in PASSED_ENV if name in os.environ})
    return env


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Connect to ``config.address`` or start a local cluster (dashboard on 127.0.0.1 if enabled).

    Ray's log records and every line its workers print go to the run's log file, and to the
    terminal only with ``--verbose`` (``rlrestore.runtime.console``). An already-initialised
    session (tests, notebooks) is reused and left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    route_ray_logging()
    kwargs: dict = {"runtime_env": {"env_vars": worker_env()}, "log_to_driver": True, "configure_logging": False}
    if config.address is None:
        kwargs.update(
            num_cpus=config.num_cpus,
            include_dashboard=config.include_dashboard,
            dashboard_host=config.dashboard_host,
        )
    else:
        kwargs["address"] = config.address
    context = ray.init(**kwargs)
    capture_worker_output()
    session_dir = context.address_info.get("session_dir")
    if session_dir:
        logging.getLogger(WORKER_LOGGER).info("Ray's own logs of this session: %s/logs", session_dir)
    try:
        yield
    finally:
        ray.shutdown()


def prepare_shards(config: RunConfig) -> Path:
    """The training shards: ``data.shards`` if given, else built once from the embedded faces."""
    if config.data.shards is not None:
        shards = Path(config.data.shards).resolve()
        if not any(shards.glob("shard-*.parquet")):
            raise FileNotFoundError(
                f"data.shards={config.data.shards!r} holds no shard-*.parquet; build them with "
                f"`rlrestore data build --src FACES --out {config.data.shards}`"
            )
        check_shards(shards)  # a damaged shard fails here, not inside a worker
        return shards
    shards = Path(config.run_dir).resolve() / "data"
    manifest = read_manifest(shards)
    if manifest is None or manifest.get("image_size") != config.data.image_size:
        report = build_shards(
            embedded_faces_dir(), shards, config.data.image_size, config.data.shard_size, config.logging.progress
        )
        log.info("built the embedded face pack into %s: %s", shards, report.summary().splitlines()[0])
    return shards


def held_back_faces(config: RunConfig) -> dict[str, np.ndarray]:
    """The clean faces ``data.holdout`` keeps out of training, at the policy's resolution, by id: what
    the demo, the control and the demo policy's pretraining script restore and score."""
    _, holdout = split_holdout(read_shards(prepare_shards(config)), config.data.holdout)
    return {record.id: square_resize(record.image, config.policy.resolution) for record in holdout}


@dataclass(frozen=True)
class Stage1Result:
    """Where a Stage 1 job ended: its newest checkpoint, the step reached of ``steps``, the seconds of
    its steps (None for a checkpoint written before they were recorded) and whether ``max_seconds``
    stopped it."""

    stage: str
    checkpoint: Path
    step: int
    steps: int
    seconds: float | None
    timed_out: bool

    @classmethod
    def read(cls, run_dir: str | Path, stage: str) -> Stage1Result | None:
        """The result recorded with the stage's newest checkpoint (None without one)."""
        checkpoint = latest_checkpoint(run_dir, stage)
        if checkpoint is None:
            return None
        path = checkpoint / STEP_SUMMARY
        summary = json.loads(path.read_text()) if path.is_file() else {}
        step = int(checkpoint.name.removeprefix("step_"))
        return cls(
            stage, checkpoint, step, int(summary.get("steps", step)), summary.get("train_seconds"),
            bool(summary.get("timed_out", False)),
        )  # fmt: skip


def run_stage1(config: RunConfig, stage: StageName) -> Stage1Result | None:
    """Run Stage 1.1 or 1.2 as a Ray Train job; resumes from the run directory's checkpoints.
    Returns where it ended (None when ``steps`` is 0: the stage is skipped)."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.stage1 import train_stage1_worker

    if config.stage(stage).steps == 0:
        log.info("%s: steps=0, skipped", stage)
        return None
    check_stage(config.policy.type, stage)
    check_run_devices(config, [stage])
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    shards = prepare_shards(config)
    workers = config.ray.train_workers
    trainer = TorchTrainer(
        train_stage1_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "stage": stage, "shards": str(shards)},
        scaling_config=ScalingConfig(
            num_workers=workers.num_actors,
            use_gpu=workers.num_gpus > 0,
            resources_per_worker=workers.bundle(),
        ),
        torch_config=TorchConfig(backend="nccl" if workers.num_gpus > 0 else "gloo"),
        run_config=TrainRunConfig(
            name=stage.replace(".", "_"),
            storage_path=str(run_dir / "ray_results"),
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
        ),
    )
    steps, seconds = config.stage(stage).steps, config.stage(stage).max_seconds
    with follow_progress(progress_path(run_dir, stage), stage, steps, config.logging.progress, seconds):
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{stage} failed: {result.error}")
    ended = Stage1Result.read(run_dir, stage)
    if ended is None:
        raise RuntimeError(f"{stage} ended without a checkpoint in {run_dir / 'checkpoints' / stage}")
    if ended.timed_out:
        log.info("%s: stopped by its time limit after step %d (%.1f s of steps; max_seconds=%g)", stage,
                 ended.step, ended.seconds, seconds)  # fmt: skip
    return ended
