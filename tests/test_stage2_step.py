"""The Stage 2 step as one method on small interfaces (in-process fakes, no Ray), its typed
records, and the typed fault and reward-failure records with their JSON layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewards import RewardAggregator, RewardErrorLog
from rewards.pool import RewardErrorCounts, RewardOutcome
from rewards.worker import RewardFailure, RewardTimeout
from rlrestore.config import RewardSpec
from rlrestore.orchestration.stage2 import FaultLog
from rlrestore.orchestration.stage2_step import Stage2Step, StepRollouts, phase
from rlrestore.policies.prefrestore import PrefRestoreCondition
from rlrestore.runtime.dataplane import (
    LearnerInputs,
    RewardInputs,
    RolloutMeta,
    RolloutParts,
    Traffic,
    payload_bytes,
)
from trainers.nft_learner import StepSamples

GROUPS, K = 2, 3


def step_rollouts(version: int) -> StepRollouts:
    meta = RolloutMeta(
        ids=[f"face{g}" for g in range(GROUPS)],
        captions=[""] * GROUPS,
        seeds=torch.zeros(GROUPS, K, dtype=torch.long),
        policy_version=version,
    )
    reward = RewardInputs(
        torch.zeros(GROUPS, K, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(GROUPS, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(GROUPS, 3, 8, 8, dtype=torch.uint8),
    )
    condition = PrefRestoreCondition(
        torch.zeros(GROUPS, 5, 6), torch.zeros(GROUPS, 4, 2, 2), torch.zeros(GROUPS, 4, dtype=torch.long)
    )
    learner = LearnerInputs(torch.randn(GROUPS, K, 4, 2, 2), condition)
    parts = RolloutParts.of(meta, reward, learner)
    return StepRollouts([parts.meta], [parts.reward], [parts.learner])


class InMemoryStep(Stage2Step):
    """Stage2Step on in-process stand-ins that record what they are asked to do."""

    def __init__(self, failures: list[RewardFailure]) -> None:
        self.calls: list[tuple] = []
        calls = self.calls

        class Rollouts:
            def launch(self, step: int) -> list:
                return []

            def collect(self, pending: list, step: int, traffic: Traffic) -> StepRollouts:
                calls.append(("rollout", step))
                return step_rollouts(version=step - 1)

        class Scorer:
            def score_rollouts(self, parts: list, metas: list, traffic: Traffic) -> RewardOutcome:
                count = sum(part.images.shape[0] * part.images.shape[1] for part in parts)
                calls.append(("reward", count, sum(meta.inputs * meta.candidates for meta in metas)))
                return RewardOutcome({"sharpness": torch.arange(float(count))}, failures)

        class Learner:
            def train_step(self, samples: StepSamples, step: int, traffic: Traffic) -> dict[str, float]:
                calls.append(("learn", len(samples.local()), step))
                return {"loss": 0.25}

            def skip_step(self, step: int) -> None:
                calls.append(("skip", step))

        specs = [RewardSpec(name="sharpness")]
        self.rollouts, self.rewards, self.learners = Rollouts(), Scorer(), Learner()
        self.aggregator = RewardAggregator(specs)
        self.reward_errors = RewardErrorLog(specs)

    def sync_weights(self, version: int) -> int:
        self.calls.append(("sync", version))
        return 1234


def test_a_step_is_rollout_reward_learn_sync_each_timed() -> None:
    stepper = InMemoryStep(failures=[])
    record = stepper.run_step(3, stepper.rollouts.launch(3))
    assert stepper.calls == [("rollout", 3), ("reward", GROUPS * K, GROUPS * K), ("learn", GROUPS * K, 3), ("sync", 4)]
    assert list(record.timings) == ["rollout", "reward", "learn", "sync"]
    assert all(seconds >= 0 for seconds in record.timings.values())
    metrics = record.metrics()
    assert metrics["learn/loss"] == 0.25 and metrics["policy_lag"] == 1.0
    assert metrics["reward/skipped_step"] == 0.0 and metrics["reward/errors/sharpness"] == 0.0
    assert {f"timing/{name}" for name in record.timings} <= set(metrics)
    assert metrics["throughput/candidates_per_s"] > 0
    assert record.rewards.r.shape == (GROUPS, K) and record.rollouts.sizes == [GROUPS * K]
    assert metrics["sync/bytes"] == 1234 and metrics["sync/seconds"] == record.timings["sync"]
    assert metrics["rollout/bytes"] == GROUPS * K * 3 * 64 + 2 * GROUPS * 3 * 64 + payload_bytes(record.rollouts.learner)
    assert metrics["driver/bytes_in"] == metrics["driver/bytes_out"] == 0  # nothing crossed a process


def test_a_step_whose_weighted_reward_failed_is_counted_but_not_trained() -> None:
    failure = RewardFailure.of("sharpness", (0, 2), [RuntimeError("broke")], "skip_step")
    stepper = InMemoryStep(failures=[failure])
    record = stepper.run_step(0, [])
    assert ("skip", 0) in stepper.calls and not any(call[0] == "learn" for call in stepper.calls)
    assert stepper.calls[-1] == ("sync", 1)  # versions keep counting steps
    assert record.learned == {} and record.errors.skip
    metrics = record.metrics()
    assert metrics["reward/skipped_step"] == 1.0 and not any(key.startswith("learn/") for key in metrics)


def test_phase_times_a_block_even_when_it_raises() -> None:
    timings: dict[str, float] = {}
    with phase("a", timings):
        pass
    with pytest.raises(ValueError), phase("b", timings):
        raise ValueError("stop")
    assert list(timings) == ["a", "b"] and all(value >= 0 for value in timings.values())


# ----------------------------------------------------------------------------- typed records
def test_a_reward_failure_is_built_in_one_place() -> None:
    failures = [RewardTimeout("no result within 1 s"), RuntimeError("scorer exploded")]
    failure = RewardFailure.of("hpsv2", (4, 8), failures, "retry", recovered=True)
    assert (failure.attempts, failure.failed, failure.recovered, failure.timed_out) == (3, 2, True, True)
    assert failure.error == "RuntimeError: scorer exploded" and "scorer exploded" in failure.traceback
    assert failure.samples == "4:8" and failure.shifted(10).samples == "14:18"
    lost = RewardFailure.of("hpsv2", (0, 4), [RuntimeError("gone")], "retry", actor_lost=True, error="actor died")
    assert (lost.error, lost.traceback, lost.actor_lost, lost.attempts) == ("actor died", "", True, 1)


def test_reward_errors_json_keeps_its_layout_and_resumes(tmp_path: Path) -> None:
    specs = [RewardSpec(name="sharpness")]
    errors = RewardErrorLog(specs)
    errors.record(2, [RewardFailure.of("sharpness", (0, 2), [RuntimeError("broke")], "retry")])
    path = tmp_path / "reward_errors.json"
    errors.write(path)
    written = json.loads(path.read_text())
    assert written == {
        "skipped_steps": [2],
        "rewards": {
            "sharpness": {
                "failed_calls": 1, "failed_attempts": 1, "retried_calls": 0, "recovered_calls": 0,
                "timeouts": 0, "skipped_steps": 1,
                "first_errors": [{"step": 2, "samples": "0:2", "error": "RuntimeError: broke"}],
            }
        },
    }  # fmt: skip
    assert RewardErrorCounts.from_json(written["rewards"]["sharpness"]) == errors.counts["sharpness"]
    resumed = RewardErrorLog(specs)
    resumed.load(path)
    resumed.record(5, [RewardFailure.of("sharpness", (2, 4), [RuntimeError("again")], "retry")])
    counts = resumed.counts["sharpness"]
    assert (counts.failed_calls, counts.skipped_steps, resumed.skipped_steps) == (2, 2, [2, 5])
    assert [entry.step for entry in counts.first_errors] == [2, 5]


def test_faults_json_lists_typed_faults_and_bounds_them(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    faults = FaultLog(path, limit=1, resume=False)
    faults.record(3, "rollout actor 0", RuntimeError("killed"), "replaced; its chunk is redone")
    assert json.loads(path.read_text()) == [
        {"step": 3, "role": "rollout actor 0", "error": "RuntimeError: killed", "action": "replaced; its chunk is redone"}
    ]
    resumed = FaultLog(path, limit=1, resume=True)
    assert [fault.role for fault in resumed] == ["rollout actor 0"] and len(resumed) == 1
    assert len(FaultLog(path, limit=1, resume=False)) == 0  # a fresh run starts a new list
    with pytest.raises(RuntimeError, match=r"stopped after 2 actor failures \(stage2.faults.max_actor_failures=1\)"):
        resumed.record(4, "learner group", RuntimeError("lost"), "rebuilt")
