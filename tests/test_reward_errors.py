"""Reward failures: each error policy on the plain RewardWorker with fault-injecting rewards, the
run's error log, reward-actor groups in the config, and Stage 2 on Ray surviving a raising and a
hanging reward in their own actor group under skip_step."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from rewards import RewardAggregator, RewardBatch, RewardError, RewardErrorLog, RewardWorker
from rewards.worker import RewardFailure
from rlrestore.config import ConfigError, RewardErrorConfig, RewardSpec, Stage2Config, load_config
from tests.conftest import tiny_config

FAULTS = "tests.fault_rewards"
COUNT = 6


def _images() -> torch.Tensor:
    return torch.linspace(-1, 1, COUNT)[:, None, None, None].expand(COUNT, 3, 8, 8).contiguous()


def _batch(**metadata_flags: set[int]) -> RewardBatch:
    metadata = [{flag: i in indices for flag, indices in metadata_flags.items()} for i in range(COUNT)]
    return RewardBatch([""] * COUNT, metadata=metadata)


def _worker(*specs: RewardSpec, batch_size: int = 2, **errors) -> RewardWorker:
    return RewardWorker(list(specs), batch_size=batch_size, errors=RewardErrorConfig(**errors))


def _spec(cls: str, **fields) -> RewardSpec:
    return RewardSpec(name=f"{FAULTS}:{cls}", **fields)


BRIGHTNESS = _images().mean(dim=(1, 2, 3))


# ---------------------------------------------------------------- policies on the worker


def test_retry_recovers_a_transient_failure() -> None:
    worker = _worker(_spec("FirstCallsFail", args={"failures": 2}), policy="retry", retries=2)
    scores = worker.score(_images(), _batch())
    torch.testing.assert_close(scores["first_calls_fail"], BRIGHTNESS)  # real scores, no NaN
    [error] = worker.take_errors()
    assert (error.start, error.stop, error.attempts, error.failed) == (0, 2, 3, 2)
    assert error.recovered and not error.timed_out
    assert error.error == "RuntimeError: transient failure 2 of 2"


def test_retry_gives_up_after_n_retries_and_scores_nan() -> None:
    worker = _worker(_spec("Raising"), _spec("FirstCallsFail"), policy="retry", retries=1)
    scores = worker.score(_images(), _batch())
    assert torch.isnan(scores["raising"]).all()
    torch.testing.assert_close(scores["first_calls_fail"], BRIGHTNESS)
    raising = [e for e in worker.errors if e.reward == "raising"]
    assert [(e.start, e.stop, e.attempts, e.recovered) for e in raising] == [
        (0, 2, 2, False), (2, 4, 2, False), (4, 6, 2, False),
    ]  # fmt: skip
    assert all(e.policy == "retry" and "scorer exploded" in e.traceback for e in raising)


def test_skip_step_does_not_retry_and_a_wrong_shape_is_an_error() -> None:
    specs = [_spec("WrongShape", on_error="skip_step"), _spec("FirstCallsFail", on_error="skip_step")]
    worker = _worker(*specs, batch_size=COUNT, policy="retry", retries=3)  # on_error overrides policy
    scores = worker.score(_images(), _batch())
    assert torch.isnan(scores["wrong_shape"]).all() and torch.isnan(scores["first_calls_fail"]).all()
    errors = {e.reward: e for e in worker.take_errors()}
    assert errors["wrong_shape"].attempts == errors["first_calls_fail"].attempts == 1
    assert "'wrong_shape' must return one score per image (6,), got (6, 2)" in errors["wrong_shape"].error


@pytest.mark.parametrize("cls", ["Raising", "WrongShape"])
def test_fail_raises_with_the_reward_name_and_error(cls: str) -> None:
    worker = _worker(_spec(cls, on_error="fail"), policy="skip_step")
    message = "scorer exploded" if cls == "Raising" else "must return one score per image"
    with pytest.raises(
        RewardError, match=rf"reward '\w+' failed on samples 0:2 \(on_error=fail\): .*{message}"
    ):
        worker.score(_images(), _batch())


def test_nan_scores_are_no_error_and_the_aggregator_masks_them() -> None:
    worker = _worker(_spec("NaNScores", on_error="fail"))
    scores = worker.score(_images(), _batch(nan={1, 4}))
    assert worker.errors == []
    assert torch.isnan(scores["nan_scores"]).tolist() == [False, True, False, False, True, False]
    result = RewardAggregator([_spec("NaNScores")]).combine(scores, groups=2, candidates=3)
    assert result.valid.tolist() == [[True, False, True], [True, False, True]]
    assert result.metrics["reward/nonfinite/nan_scores"] == 2


def test_a_hanging_reward_times_out_and_its_remaining_chunks_are_not_attempted() -> None:
    specs = [
        _spec("Sleeping", args={"seconds": 30.0}, timeout_s=0.2),
        _spec("FirstCallsFail", args={"failures": 0}),
    ]
    worker = _worker(*specs, policy="retry", retries=1, timeout_s=60.0)  # the spec's timeout wins
    began = time.perf_counter()
    scores = worker.score(_images(), _batch())
    assert time.perf_counter() - began < 5.0  # 2 attempts x 0.2 s, not 3 chunks x 30 s
    assert torch.isnan(scores["sleeping"]).all()
    torch.testing.assert_close(scores["first_calls_fail"], BRIGHTNESS)
    [error] = worker.errors
    assert (error.start, error.stop, error.attempts, error.timed_out) == (0, COUNT, 2, True)
    assert error.error == "RewardTimeout: no result within 0.2 s; samples 0:6 not scored"


# ---------------------------------------------------------------- the run's error log


def _error(reward: str, recovered: bool = False, failed: int = 1, timed_out: bool = False) -> RewardFailure:
    return RewardFailure(
        reward, 0, 2, attempts=failed + recovered, failed=failed, recovered=recovered, timed_out=timed_out,
        policy="retry", error=f"RuntimeError: {reward} broke",
    )  # fmt: skip


def test_error_log_counts_skips_and_summarises(tmp_path: Path) -> None:
    specs = [
        _spec("Raising", weight=1.0),
        _spec("FirstCallsFail", weight=1.0),
        _spec("NaNScores", weight=0.0),
    ]
    errors = RewardErrorLog(specs)
    step0 = errors.record(0, [_error("first_calls_fail", recovered=True, failed=2), _error("nan_scores")])
    assert not step0.skip  # a recovered retry and a weight-0 reward's failure: the step trains
    assert step0.metrics == {
        "reward/errors/raising": 0.0, "reward/errors/first_calls_fail": 2.0, "reward/errors/nan_scores": 1.0,
        "reward/skipped_step": 0.0,
    }  # fmt: skip
    step1 = errors.record(1, [_error("raising"), _error("raising", timed_out=True)])
    assert step1.skip and step1.skipped_by == ["raising"] and step1.metrics["reward/skipped_step"] == 1.0
    assert errors.record(2, []).metrics["reward/errors/raising"] == 0.0

    summary = errors.summary()
    assert summary["skipped_steps"] == [1]
    raising = summary["rewards"]["raising"]
    assert (raising["failed_calls"], raising["timeouts"], raising["skipped_steps"]) == (2, 1, 1)
    assert raising["first_errors"][0] == {"step": 1, "samples": "0:2", "error": "RuntimeError: raising broke"}
    flaky = summary["rewards"]["first_calls_fail"]
    assert (flaky["failed_attempts"], flaky["retried_calls"], flaky["recovered_calls"]) == (2, 1, 1)
    assert "raising: 2 failed attempts" in errors.format()

    path = tmp_path / "reward_errors.json"
    errors.write(path)
    resumed = RewardErrorLog(specs)
    resumed.load(path)
    resumed.record(5, [_error("raising")])
    assert resumed.summary()["skipped_steps"] == [1, 5]
    assert resumed.summary()["rewards"]["raising"]["failed_calls"] == 3
    assert json.loads(path.read_text())["rewards"]["raising"]["failed_calls"] == 2
    assert RewardErrorLog(specs).format() == "reward errors: none"


# ---------------------------------------------------------------- reward-actor groups


def test_reward_actor_groups_come_from_the_config() -> None:
    stage = Stage2Config(
        rewards=[RewardSpec(name="sharpness"), RewardSpec(name="psnr", actor="gpu"), RewardSpec(name="ssim")],
        resources={"reward_groups": {"gpu": {"num_actors": 2, "num_cpus": 1, "num_gpus": 0.5}, "unused": {}}},
    )
    groups = stage.reward_actor_groups()
    assert list(groups) == ["default", "gpu"]  # a group no reward names starts no actor
    assert groups["default"][0] == stage.resources.reward
    assert [spec.name for spec in groups["default"][1]] == ["sharpness", "ssim"]
    assert (groups["gpu"][0].num_actors, groups["gpu"][0].num_gpus) == (2, 0.5)

    with pytest.raises(
        ConfigError,
        match=r"stage2.rewards.1.actor = 'gpus' \(reward 'psnr'\) names no "
        r"reward-actor group; define stage2.resources.reward_groups.gpus or use one of: default, gpu",
    ):
        load_config(None, ["stage2.rewards=[{name: sharpness}, {name: psnr, actor: gpus}]",
                           "stage2.resources.reward_groups={gpu: {num_gpus: 1}}"])  # fmt: skip
    with pytest.raises(ConfigError, match="the default group is sized by stage2.resources.reward"):
        load_config(None, ["stage2.resources.reward_groups={default: {num_cpus: 1}}"])
    with pytest.raises(ConfigError, match=r"on_error = 'ignore'.*'retry', 'skip_step' or 'fail'"):
        load_config(None, ["stage2.rewards=[{name: sharpness, on_error: ignore}]"])


# ---------------------------------------------------------------- Stage 2 on Ray


@pytest.mark.slow
def test_stage2_skips_steps_whose_rewards_fail_and_reports_them(tmp_path: Path, ray_cluster) -> None:
    from rlrestore.checkpoints import save_checkpoint
    from rlrestore.orchestration.stage2 import run_stage2
    from rlrestore.tracking import read_metrics
    from tests.conftest import build_tiny_policy
    from tests.test_stage2_ray import STAGE2

    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, "stage1.2", 1, build_tiny_policy(), {"step": 1}, keep=1)
    faulty = {"actor": "faulty", "on_error": "skip_step", "weight": 0.5}
    rewards = [
        {"name": "sharpness"},
        {"name": f"{FAULTS}:RaiseOnce", "args": {"marker": str(tmp_path / "raised")}, **faulty},
        {
            "name": f"{FAULTS}:HangOnce",
            "args": {"marker": str(tmp_path / "hung")},
            "timeout_s": 1.0,
            **faulty,
        },
    ]
    config = tiny_config(
        run_dir, *STAGE2, "stage2.steps=2", "stage2.resources.learner.num_actors=1", "stage2.learner.zero_stage=0",
        "stage2.resources.rollout.num_actors=1", "stage2.outputs.checkpoint_every=1", "stage2.outputs.sample_grid_every=100",
        f"stage2.rewards={json.dumps(rewards)}", "stage2.resources.reward_groups={faulty: {num_cpus: 0.1}}",
        "logging.wandb_mode=disabled",
    )  # fmt: skip
    run_stage2(config)

    frame = read_metrics(run_dir, "stage2").set_index("step")
    assert frame.index.tolist() == [0, 1]
    assert frame["reward/skipped_step"].tolist() == [1.0, 0.0]
    for name in ("raise_once", "hang_once"):
        assert frame[f"reward/errors/{name}"].tolist() == [1.0, 0.0]
        assert math.isnan(frame.loc[0, f"reward/{name}/mean"]) and math.isfinite(
            frame.loc[1, f"reward/{name}/mean"]
        )
    assert frame["reward/errors/sharpness"].tolist() == [0.0, 0.0]
    assert math.isnan(frame.loc[0, "learn/loss"]) and math.isfinite(frame.loc[1, "learn/loss"])
    # the skipped step still counts on the learners: the checkpoint after it resumes at step 1
    learner = run_dir / "checkpoints" / "stage2" / "step_000001" / "learner" / "learner_state.json"
    assert json.loads(learner.read_text())["step"] == 1

    summary = json.loads((run_dir / "reward_errors.json").read_text())
    assert summary["skipped_steps"] == [0]
    raised, hung = summary["rewards"]["raise_once"], summary["rewards"]["hang_once"]
    assert (raised["failed_calls"], raised["skipped_steps"], raised["timeouts"]) == (1, 1, 0)
    assert raised["first_errors"][0]["error"] == "RuntimeError: first call of the run fails"
    assert (hung["failed_calls"], hung["timeouts"]) == (1, 1)
    assert hung["first_errors"][0]["error"].startswith("RewardTimeout: no result within 1 s")
