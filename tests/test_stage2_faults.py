"""Fault tolerance of Stage 2 and of checkpoint writes, each fault a SIGKILL of a real process.

One reference run without faults; a run in which a rollout actor, a reward actor and a learner
rank are killed mid-run; a driver killed mid-run and the same command run again; a process killed
while it writes a checkpoint. Every faulted run must finish with every step logged once and the
same final weights as the reference (Stage 2 on CPU is deterministic: seeded rollouts, 2-rank gloo
reductions, restored optimizer state). The runs are asynchronous (rollouts of step i + 1 during
step i), the harder case for both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from rlrestore.checkpoints import list_checkpoints, load_trainer_state
from rlrestore.orchestration.jobs import run_stage1
from rlrestore.orchestration.stage2 import FAULTS_FILE, Stage2Run, run_stage2
from rlrestore.policies.prefrestore import PrefRestorePolicy
from rlrestore.tracking import read_metrics
from tests.conftest import TINY_CONFIG, tiny_config

pytestmark = pytest.mark.slow

STEPS = 6
STAGE2 = (
    "stage1_1.steps=2",
    "stage1_2.steps=2",
    f"stage2.steps={STEPS}",
    "stage2.inputs_per_step=2",
    "stage2.candidates=3",
    "stage2.rollout.batch_size=1",
    "stage2.rollout.sampler_steps=2",
    "stage2.outputs.checkpoint_every=2",
    "stage2.outputs.keep_checkpoints=10",
    "stage2.outputs.sample_grid_every=100",
    "stage2.resources.learner.num_actors=2",
    "stage2.learner.zero_stage=2",
    # async: a replaced rollout actor must redo its chunk with the weights the chunk was launched
    # with, and a run resumed or rebuilt from a checkpoint must roll out with the lagged weights
    # stored there, or the final weights differ from the reference
    "stage2.rollout.asynchronous=true",
)
REPO = Path(__file__).resolve().parents[1]
SECRET = "wandb-key-3f9c2e71-never-logged-8d4b"


def actor_pid(handle) -> int:
    """PID of a live actor of this run (asked through its handle, so other Ray sessions on the
    machine, e.g. a second test run, are never touched)."""
    return ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()), timeout=120)


def final_dit(run_dir: Path) -> dict[str, torch.Tensor]:
    step_dir = run_dir / "checkpoints" / "stage2" / f"step_{STEPS:06d}"
    return load_file(str(step_dir / "policy" / "transformer" / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    ours, theirs = final_dit(run_dir), final_dit(reference)
    assert ours.keys() == theirs.keys()
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not different, f"{len(different)} DiT tensors differ from the run without faults, e.g. {different[:3]}"


def assert_every_step_once(run_dir: Path) -> None:
    frame = read_metrics(run_dir, "stage2")
    assert frame["step"].tolist() == list(range(STEPS))
    assert (frame["reward/skipped_step"] == 0).all() and (frame["learn/samples"] > 0).all()
    assert [step for step, _ in list_checkpoints(run_dir, "stage2")] == [2, 4, 6]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory: pytest.TempPathFactory, ray_cluster) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "stage1"
    config = tiny_config(run_dir, *STAGE2)
    for stage in ("stage1.1", "stage1.2"):
        run_stage1(config, stage)
    return run_dir


@pytest.fixture(scope="module")
def reference(stage1_run: Path) -> Path:
    """The same Stage 2 run without faults."""
    run_dir = stage1_run.parent / "reference"
    shutil.copytree(stage1_run, run_dir)
    run_stage2(tiny_config(run_dir, *STAGE2))
    assert_every_step_once(run_dir)
    return run_dir


def wait_for(condition, what: str, thread: threading.Thread, errors: list, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert thread.is_alive(), f"the run ended before {what}: {errors}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killed_rollout_reward_and_learner_actors(stage1_run: Path, reference: Path) -> None:
    run_dir = stage1_run.parent / "faulted"
    shutil.copytree(stage1_run, run_dir)
    run = Stage2Run(tiny_config(run_dir, *STAGE2))
    errors: list[BaseException] = []

    def train() -> None:
        try:
            run.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertions below
            errors.append(exc)
        finally:
            run.shutdown()

    thread = threading.Thread(target=train)
    thread.start()
    injected = []
    # After the checkpoint of step 2, kill a learner rank: the group is rebuilt from it and, as the
    # run is async, step 2 is rolled out again with the lagged weights stored in that checkpoint.
    wait_for(lambda: run.step >= 3 and list_checkpoints(run_dir, "stage2"), "the step-2 checkpoint", thread, errors)
    assert len(run.learners.actors) == 2
    os.kill(actor_pid(run.learners.actors[-1]), signal.SIGKILL)
    injected.append("LearnerActor")
    # Step 4 of the rebuilt run is under way (step 5 is rolling out with the weights of step 4):
    # kill a rollout actor, then the reward actor. The rollout actor's chunk must be redone with
    # the weights it was launched with, not the newer ones the replacement got at the next sync.
    rebuilt = lambda: any(fault.role == "learner group" for fault in run.faults)
    wait_for(lambda: rebuilt() and run.step >= 4, "step 4 after the rebuild", thread, errors)
    for role, handle in (("RolloutWorker", run.rollouts.actors[0]), ("RewardActor", run.rewards.actors[0])):
        os.kill(actor_pid(handle), signal.SIGKILL)
        injected.append(role)
    thread.join(timeout=600)
    assert not thread.is_alive() and not errors, errors

    faults = json.loads((run_dir / FAULTS_FILE).read_text())
    roles = [fault["role"] for fault in faults]
    assert any(role.startswith("rollout actor") for role in roles), faults
    assert "learner group" in roles, faults
    print(f"faults injected: {injected}; recorded by the driver: {roles}; all survived, 0 steps lost")
    assert_every_step_once(run_dir)
    assert_same_weights(run_dir, reference)


def test_a_killed_driver_resumes_from_its_last_checkpoint(stage1_run: Path, reference: Path) -> None:
    run_dir = stage1_run.parent / "driver"
    shutil.copytree(stage1_run, run_dir)
    command = [
        sys.executable, "-m", "rlrestore", "train", "stage2", str(TINY_CONFIG),
        f"run_dir={run_dir}", "logging.progress=false", "ray.num_cpus=2", *STAGE2,
    ]  # fmt: skip
    # Not the W&B service of this test process (wandb.init exports its address to children): the
    # killed driver's run would stay open there and the rerun could not resume it.
    env = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
    env["PYTHONPATH"] = str(REPO)
    env["WANDB_API_KEY"] = SECRET  # must never reach a log, metrics or config file
    proc = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 400
    try:
        while not list_checkpoints(run_dir, "stage2"):
            assert proc.poll() is None, "the driver exited before it could be killed"
            assert time.monotonic() < deadline, "no Stage 2 checkpoint within 400 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [step for step, _ in list_checkpoints(run_dir, "stage2")] == [2]

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_every_step_once(run_dir)
    assert_same_weights(run_dir, reference)
    assert SECRET not in rerun.stdout + rerun.stderr
    ray_logs = Path("/tmp/ray/session_latest/logs")  # the rerun's own local cluster
    for root in (run_dir, ray_logs):
        leaks = [path for path in root.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
        assert not leaks, f"the W&B key leaked into {leaks}"


_WRITER = """
import sys, time
from pathlib import Path
import tests.conftest
from rlrestore.checkpoints import save_checkpoint
from tests.conftest import build_tiny_policy

run_dir, marker = Path(sys.argv[1]), Path(sys.argv[2])
policy = build_tiny_policy(0)
save_checkpoint(run_dir, "stage2", 2, policy, {"step": 2}, keep=5)

def stall(directory):
    marker.write_text(str(directory))  # half of step 4 is on disk now
    time.sleep(300)

save_checkpoint(run_dir, "stage2", 4, policy, {"step": 4}, keep=5, extra=stall)
"""


def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(run_dir), str(marker)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never reached the second checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    half_written = Path(marker.read_text())
    assert half_written.is_dir() and (half_written / "policy").is_dir()
    found = list_checkpoints(run_dir, "stage2")
    assert [step for step, _ in found] == [2]
    assert load_trainer_state(found[0][1]) == {"step": 2}
    PrefRestorePolicy.from_pretrained(found[0][1] / "policy")  # loads whole
