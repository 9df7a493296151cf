"""Device choice of every role on this CPU machine with CUDA availability patched, the refusals
before anything starts, and ``devices.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.worker import RewardActor
from rlrestore.config import RewardSpec, RunConfig, SamplerConfig
from rlrestore.data import save_image
from rlrestore.orchestration.cli import main
from rlrestore.orchestration.evaluation import EvalWorker
from rlrestore.policies.prefrestore import PrefRestorePolicy
from rlrestore.runtime.devices import (
    DEVICES_FILE,
    DeviceError,
    DeviceRecord,
    actor_device,
    check_cluster_gpus,
    check_run_devices,
    local_device,
    train_worker_device,
    write_devices,
)
from tests.conftest import TINY_CONFIG, build_tiny_policy, tiny_config

CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture
def cuda(monkeypatch):
    """CUDA reported available (no GPU is touched: model moves are recorded instead)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def moves(monkeypatch) -> list[torch.device]:
    """Where policies are sent with ``.to(device)``; they stay on the CPU."""
    seen: list[torch.device] = []
    original = PrefRestorePolicy.to

    def record(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device)):
            seen.append(torch.device(args[0]))
            return self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrefRestorePolicy, "to", record)
    return seen


def _read_devices(folder: Path) -> list[dict]:
    return json.loads((folder / DEVICES_FILE).read_text())


# ----------------------------------------------------------------------------- device choice
def test_local_device_for_in_process_commands(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_device("auto") == CUDA0 and local_device("cuda") == CUDA0
    assert local_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device("auto") == CPU and local_device("cpu") == CPU
    with pytest.raises(DeviceError, match="device=cuda, but CUDA is not available on this machine"):
        local_device("cuda")


def test_actor_device_is_the_assigned_gpu_or_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert actor_device("auto", 1, "eval actors", "eval.actors.num_gpus") == CUDA0
    assert actor_device("cuda", 0.25, "eval actors", "eval.actors.num_gpus") == CUDA0  # fractional: still its GPU
    assert actor_device("auto", 0, "eval actors", "eval.actors.num_gpus") == CPU  # no GPU reserved: Ray hides them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match=r"reserved 1 GPU \(eval\.actors\.num_gpus\) but CUDA is not available") as info:
        actor_device("auto", 1, "eval actors", "eval.actors.num_gpus")
    assert "CUDA_VISIBLE_DEVICES=''" in str(info.value)


def test_stage1_worker_device_comes_from_ray_train(monkeypatch) -> None:
    import ray.train.torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 1))
    # Ray Train names the device (here cuda:1, not the local rank's): with one or half a GPU each.
    assert train_worker_device("auto", 1, nccl=True) == torch.device("cuda", 1)
    assert train_worker_device("auto", 0.5, nccl=False) == torch.device("cuda", 1)
    assert train_worker_device("auto", 0, nccl=True) == CPU
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: CPU)
    with pytest.raises(DeviceError, match=r"Ray Train gave it cpu"):
        train_worker_device("cuda", 1, nccl=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"a Stage 1 worker reserved 1 GPU \(ray\.train_workers\.num_gpus\) but CUDA"):
        train_worker_device("auto", 1, nccl=True)


def test_stage1_worker_uses_the_device_rules() -> None:
    """The worker loop takes its device from train_worker_device (no local-rank guess left)."""
    import inspect

    import trainers.stage1

    source = inspect.getsource(trainers.stage1.train_stage1_worker)
    assert "train_worker_device(config.device, config.ray.train_workers.num_gpus" in source
    assert not hasattr(trainers.stage1, "pick_device")


def _eval_worker(device: str, num_gpus: float | None, precision: str = "fp32") -> EvalWorker:
    return EvalWorker([], SamplerConfig(steps=2), tiny_config("unused").eval, device, precision, num_gpus)


def test_eval_actor_and_in_process_eval_devices(cuda, moves, tmp_path: Path) -> None:
    actor = _eval_worker("auto", num_gpus=1)
    assert actor.device == CUDA0
    assert _eval_worker("auto", num_gpus=0).device == CPU
    assert _eval_worker("auto", num_gpus=None).device == CUDA0  # in this process, a GPU is present
    assert _eval_worker("cpu", num_gpus=None).device == CPU
    policy_dir = tmp_path / "policy"
    build_tiny_policy().save_pretrained(policy_dir)
    bf16 = _eval_worker("auto", num_gpus=1, precision="bf16-mixed")
    policy = bf16.policy(str(policy_dir))
    assert moves == [CUDA0]
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}  # inference copy in bf16
    record = bf16.device_record("actor 0")
    assert (record.stage, record.role, record.actor, record.device) == ("eval", "eval", "actor 0", "cuda:0")
    assert (record.precision, record.dtype, record.gpu_name) == ("bf16-mixed", "bfloat16", "Fake GPU")


def test_eval_without_cuda(no_cuda) -> None:
    assert _eval_worker("auto", num_gpus=None).device == CPU
    with pytest.raises(DeviceError, match=r"eval actors reserved 1 GPU \(eval\.actors\.num_gpus\) but CUDA"):
        _eval_worker("auto", num_gpus=1)


def _checkpoint(tmp_path: Path) -> Path:
    run = tmp_path / "policy"
    build_tiny_policy().save_pretrained(run)
    return run


def test_restore_picks_cuda_when_present_and_records_it(cuda, moves, tmp_path: Path) -> None:
    from rlrestore.orchestration.restore import restore_files

    face = tmp_path / "in" / "face.png"
    save_image(np.full((40, 30, 3), 128, np.uint8), face)
    report = restore_files(
        _checkpoint(tmp_path), [face], tmp_path / "out", SamplerConfig(steps=2), progress=False, precision="bf16-mixed"
    )
    assert report.outputs and moves == [CUDA0]
    (record,) = _read_devices(tmp_path / "out")
    assert record["device"] == "cuda:0" and record["role"] == "restore"
    assert record["precision"] == "bf16-mixed" and record["dtype"] == "bfloat16"


def test_restore_runs_on_the_cpu_without_cuda_and_refuses_cuda(no_cuda, tmp_path: Path, capsys) -> None:
    face = tmp_path / "in" / "face.png"
    save_image(np.full((16, 16, 3), 90, np.uint8), face)
    checkpoint = _checkpoint(tmp_path)
    args = ["restore", str(face), "--ckpt", str(checkpoint), "--steps", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    (record,) = _read_devices(tmp_path / "out")
    assert (record["device"], record["precision"], record["dtype"]) == ("cpu", "fp32", "float32")
    assert main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
    assert "device=cuda, but CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()  # refused before anything was written


def test_bench_device(cuda, tmp_path: Path) -> None:
    from rlrestore.orchestration.bench import run_bench

    report = run_bench(tiny_config(tmp_path, "device=auto"), tmp_path / "bench.json", parts=[])
    assert report["device"] == "cuda:0" and report["precision"] == "fp32"
    assert _read_devices(tmp_path)[0]["device"] == "cuda:0"


def test_bench_refuses_cuda_without_it(no_cuda, tmp_path: Path) -> None:
    from rlrestore.orchestration.bench import run_bench

    with pytest.raises(DeviceError, match="device=cuda"):
        run_bench(tiny_config(tmp_path, "device=cuda"), tmp_path / "bench.json", parts=[])
    assert run_bench(tiny_config(tmp_path, "device=auto"), tmp_path / "b.json", parts=[])["device"] == "cpu"


def test_reward_actor_device_and_record(cuda) -> None:
    specs = [RewardSpec(name="sharpness")]
    on_gpu = RewardActor(specs, "auto", 1.0, 4, None, "bf16-mixed", group="gpu")
    assert on_gpu.worker.device == CUDA0
    record = on_gpu.device_record("gpu 0")
    assert isinstance(record, DeviceRecord)
    assert (record.stage, record.role, record.actor, record.device) == ("stage2", "reward", "gpu 0", "cuda:0")
    assert (record.precision, record.dtype, record.autocast) == ("bf16-mixed", "float32", None)  # sharpness: fp32
    assert RewardActor(specs, "auto", 0.0, 4, None).worker.device == CPU
    with pytest.raises(DeviceError, match=r"device=cpu, but reward actors \(gpu\) reserve 0\.5 GPU each "
                       r"\(stage2\.resources\.reward_groups\.gpu\.num_gpus\)"):  # fmt: skip
        RewardActor(specs, "cpu", 0.5, 4, None, group="gpu")


def test_reward_actor_without_cuda(no_cuda) -> None:
    specs = [RewardSpec(name="sharpness")]
    assert RewardActor(specs, "auto", 0.0, 4, None).worker.device == CPU
    with pytest.raises(DeviceError, match=r"reward actors \(default\) reserved 1 GPU \(stage2\.resources\.reward"):
        RewardActor(specs, "auto", 1.0, 4, None)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("overrides", "stages", "message"),
    [
        (["device=cuda"], ["stage1.1"], r"device=cuda, but Stage 1 workers reserve no GPU \(ray\.train_workers\.num_gpus=0\)"),
        (
            ["device=cpu", "ray.train_workers.num_gpus=1"],
            ["stage1.2"],
            r"device=cpu, but Stage 1 workers reserve 1.0 GPU each \(ray\.train_workers\.num_gpus\)",
        ),
        (
            ["device=auto", "ray.train_workers.num_actors=2", "ray.train_workers.num_gpus=0.5"],
            ["stage1.1"],
            r"Stage 1 workers form an NCCL group.*ray\.train_workers\.num_gpus=0\.5",
        ),
        (
            ["stage2.resources.learner.num_actors=2", "stage2.resources.learner.num_gpus=0.5", "device=auto"],
            ["stage2"],
            r"Stage 2 learner ranks form an NCCL group.*stage2\.resources\.learner\.num_gpus=0\.5",
        ),
        (["device=cuda"], ["stage2"], r"Stage 2 rollout actors reserve no GPU \(stage2\.resources\.rollout\.num_gpus=0\)"),
        (
            ["device=cpu", "stage2.resources.reward.num_gpus=1"],
            ["stage2"],
            r"Stage 2 reward actors \(default\) reserve 1.0 GPU each \(stage2\.resources\.reward\.num_gpus\)",
        ),
        (
            ["device=cpu", "eval.actors.num_actors=2", "eval.actors.num_gpus=1"],
            ["eval"],
            r"device=cpu, but eval actors reserve 1.0 GPU each \(eval\.actors\.num_gpus\)",
        ),
        (["device=cuda"], ["eval"], r"device=cuda, but CUDA is not available on this machine"),
    ],
    ids=["cuda-no-gpus", "cpu-with-gpus", "nccl-fraction", "learners-fraction", "stage2-cuda-no-gpus",
         "reward-cpu-with-gpus", "eval-cpu-with-gpus", "in-process-cuda-unavailable"],
)  # fmt: skip
def test_refusals(no_cuda, tmp_path: Path, overrides: list[str], stages: list[str], message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        check_run_devices(tiny_config(tmp_path, *overrides), stages)


def test_accepted_requests(no_cuda, tmp_path: Path) -> None:
    check_run_devices(tiny_config(tmp_path), ["autoencoder", "stage1.1", "stage1.2", "stage2", "eval"])
    # one worker on half a GPU forms no NCCL group; fractional reward / rollout actors are fine
    check_run_devices(
        tiny_config(tmp_path, "device=auto", "ray.train_workers.num_actors=1", "ray.train_workers.num_gpus=0.5",
                    "stage2.resources.rollout.num_gpus=0.5", "stage2.resources.reward.num_gpus=0.25"),
        ["stage1.1", "stage2"],
    )  # fmt: skip


def test_train_refuses_before_ray_starts(tmp_path: Path, monkeypatch, capsys) -> None:
    import rlrestore.orchestration.jobs

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(rlrestore.orchestration.jobs, "ray_session", no_ray)
    run_dir = tmp_path / "run"
    for stage, override in (("stage1", "device=cuda"), ("stage2", "stage2.resources.learner.num_gpus=1.5")):
        assert main(["train", stage, str(TINY_CONFIG), f"run_dir={run_dir}", "device=auto", override]) == 2
    err = capsys.readouterr().err
    assert "reserve no GPU (ray.train_workers.num_gpus=0)" in err
    assert "Stage 2 learner ranks form an NCCL group" in err and "stage2.resources.learner.num_gpus=1.5" in err
    assert not run_dir.exists()


def test_eval_refuses_before_anything_starts(tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    code = main(["eval", str(TINY_CONFIG), "--ckpt", str(tmp_path), "--data", str(tmp_path), "--out", str(out),
                 "device=cpu", "eval.actors.num_actors=1", "eval.actors.num_gpus=1"])  # fmt: skip
    assert code == 2
    assert "eval actors reserve 1.0 GPU each (eval.actors.num_gpus)" in capsys.readouterr().err
    assert not out.exists()


def test_cluster_without_the_gpus_asked_for(monkeypatch, tmp_path: Path, caplog) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tiny_config(tmp_path, "ray.train_workers.num_gpus=1")
    with pytest.raises(DeviceError, match=r"stage1\.1 reserves 2 GPUs at once.*the Ray cluster has 0"):
        check_cluster_gpus(config, ["stage1.1"])
    remote = config.model_copy(update={"ray": config.ray.model_copy(update={"address": "auto"})})
    check_cluster_gpus(remote, ["stage1.1"])  # an autoscaler may add GPU nodes: a warning only
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # under `ray job submit`
    check_cluster_gpus(config, ["stage1.1"])
    assert caplog.text.count("waits until nodes with GPUs join") == 2
    check_cluster_gpus(tiny_config(tmp_path), ["stage1.1", "stage2", "eval"])  # no GPUs asked for


# ----------------------------------------------------------------------------- devices.json
def test_write_devices_keeps_other_stages(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    first = DeviceRecord.here("stage1.1", "worker", "rank 0", CPU, "bf16-mixed", torch.float32, autocast=torch.bfloat16)
    write_devices(tmp_path, "stage1.1", [first])
    write_devices(tmp_path, "stage2", [DeviceRecord.here("stage2", "reward", "gpu 0", CPU, "fp32", "float32")])
    again = DeviceRecord.here("stage1.1", "worker", "rank 1", CPU, "fp32", torch.float32)
    write_devices(tmp_path, "stage1.1", [again])  # a rerun replaces its stage's records only
    entries = _read_devices(tmp_path)
    assert [(e["stage"], e["actor"]) for e in entries] == [("stage2", "gpu 0"), ("stage1.1", "rank 1")]
    assert set(entries[0]) >= {"stage", "role", "actor", "node", "device", "dtype", "precision", "gpu_ids"}
    assert "stage1.1 worker rank 0: cpu on" in caplog.text and "autocast bfloat16" in caplog.text


def test_policy_checkpoint_is_checked_before_ray(tmp_path: Path, capsys) -> None:
    code = main(["train", "stage1.1", str(TINY_CONFIG), f"run_dir={tmp_path / 'run'}",
                 f"policy.checkpoint={tmp_path / 'missing'}"])  # fmt: skip
    assert code == 2
    assert f"policy.checkpoint='{tmp_path / 'missing'}'" in capsys.readouterr().err


def test_initial_policy_starts_from_policy_checkpoint(tmp_path: Path) -> None:
    from trainers.stage1 import initial_policy

    start = build_tiny_policy(3)
    start.save_pretrained(tmp_path / "converted")
    config: RunConfig = tiny_config(tmp_path / "run", f"policy.checkpoint={tmp_path / 'converted'}")
    for stage in ("stage1.1", "stage1.2"):  # no checkpoints and no hand-off in the run directory
        policy, resume = initial_policy(config, stage, dataset=None)
        assert resume is None
        torch.testing.assert_close(policy.transformer.state_dict(), start.transformer.state_dict())
    with pytest.raises(FileNotFoundError, match="or set policy.checkpoint"):
        initial_policy(tiny_config(tmp_path / "run"), "stage1.2", dataset=None)
