"""Stage 2's held-out evaluation, guard and best-checkpoint selection without Ray: the guard's
directions, the selection rule, the report, config errors, checkpoint pruning that keeps the best
one, and the rollout worker's held-out restorations with lent weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards import RewardAggregator
from rlrestore.checkpoints import list_checkpoints, save_checkpoint
from rlrestore.config import ConfigError, GuardRule, SelectionConfig
from rlrestore.data import (
    degrade_seeded,
    read_shards,
    split_holdout,
    square_resize,
)
from rlrestore.orchestration.guard import (
    REPORT_FILE,
    EvalHistory,
    EvalPoint,
    best_point,
    crossings,
    read_stage2_report,
)
from rlrestore.orchestration.stage2 import check_stage2_inputs
from rlrestore.orchestration.stage2_eval import HeldOutEval, eval_seeds
from rlrestore.runtime.dataplane import WeightUpdate
from rlrestore.runtime.seeds import sample_seed
from rollouts import RolloutWorker
from tests.conftest import build_tiny_policy, tiny_config
from tests.test_rollouts import SAMPLER, setup  # noqa: F401 - the tiny policy and shards fixture


def test_the_guard_knows_which_way_is_worse() -> None:
    rules = [GuardRule(metric="psnr", max_worse=1.0), GuardRule(metric="dlib_identity", max_worse=0.1)]
    start = {"psnr": 25.0, "dlib_identity": 0.3}
    assert crossings(rules, start, {"psnr": 24.5, "dlib_identity": 0.35}) == []
    assert crossings(rules, start, {"psnr": 30.0, "dlib_identity": 0.1}) == []  # better is never a crossing
    (psnr,) = crossings(rules, start, {"psnr": 23.9, "dlib_identity": 0.3})
    assert (psnr.metric, psnr.limit) == ("psnr", 24.0)
    assert psnr.sentence() == "eval/psnr = 23.9 is below 24 (step 0: 25, max_worse 1)"
    (identity,) = crossings(rules, start, {"psnr": 25.0, "dlib_identity": 0.41})
    assert identity.metric == "dlib_identity" and "is above 0.4" in identity.sentence()
    # a value that could not be measured (no face found) cannot be checked
    assert crossings(rules, start, {"psnr": math.nan, "dlib_identity": math.nan}) == []


def test_the_best_checkpoint_follows_the_selection_rule(tmp_path: Path) -> None:
    for step in (0, 2, 4, 6):
        (tmp_path / f"c{step}").mkdir()
    points = [
        EvalPoint(0, str(tmp_path / "c0"), {"total": 1.0, "dlib_lmd": 0.20}),
        EvalPoint(2, str(tmp_path / "c2"), {"total": 2.0, "dlib_lmd": 0.10}),
        EvalPoint(4, str(tmp_path / "c4"), {"total": 3.0, "dlib_lmd": 0.30}, ["eval/psnr = ..."]),
        EvalPoint(6, str(tmp_path / "c6"), {"total": 2.0, "dlib_lmd": 0.15}),
        EvalPoint(8, str(tmp_path / "gone"), {"total": 9.0, "dlib_lmd": 0.0}),  # pruned from disk
    ]
    assert best_point(points, SelectionConfig()).step == 6  # ties: the later one; step 4 crossed the guard
    assert best_point(points, SelectionConfig(guarded_only=False)).step == 4
    assert best_point(points, SelectionConfig(metric="dlib_lmd")).step == 2  # a distance: lowest is best
    assert best_point(points, SelectionConfig(metric="dlib_lmd", mode="max")).step == 0
    assert best_point(points[4:], SelectionConfig()) is None


def test_the_history_and_report_survive_a_resume(tmp_path: Path) -> None:
    stage = tiny_config(
        tmp_path, "stage2.eval_every=2", "stage2.eval.guard_metrics=[psnr]", "stage2.guard.action=rollback"
    ).stage2
    with pytest.raises(FileNotFoundError, match="stage2.eval_every > 0"):
        read_stage2_report(tmp_path)
    history = EvalHistory(tmp_path, stage, resume=False)
    assert [rule.metric for rule in history.rules] == ["psnr"]  # the default rule of the evaluated metric
    assert history.add(0, tmp_path, {"total": 1.0, "psnr": 20.0}) == []
    assert history.add(2, tmp_path, {"total": 2.0, "psnr": 19.0}) == []
    assert [c.metric for c in history.add(4, tmp_path, {"total": 3.0, "psnr": 17.5})] == ["psnr"]
    history.rollbacks = 1
    history.write_report(4)
    again = EvalHistory(tmp_path, stage, resume=True)
    assert [point.step for point in again.points] == [0, 2, 4] and again.rollbacks == 1
    assert again.points[2].crossed and again.start == {"total": 1.0, "psnr": 20.0}
    report = read_stage2_report(tmp_path)
    assert report["best"]["step"] == 2 and report["best"]["value"] == 2.0
    assert report["selection"] == {"metric": "total", "mode": None, "guarded_only": True, "direction": "max"}
    assert report["guard"]["rules"] == [{"metric": "psnr", "max_worse": 2.0}]
    assert report["guard"]["limits"] == {"eval/psnr": 18.0}  # the plots draw it over eval/psnr
    assert (tmp_path / REPORT_FILE).is_file() and Path(report["eval_history"]).is_file()


def test_evaluations_report_raw_metrics_and_the_trained_total(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path,
        "stage2.eval_every=1",
        "stage2.rewards=[{name: sharpness, weight: 2.0}, {name: psnr, weight: 0.0}]",
        "stage2.eval.guard_metrics=[psnr, dlib_lmd]",
    )
    held_out = HeldOutEval(config, None, RewardAggregator.from_config(config.stage2), resume=False)
    assert held_out.seeds.shape == (4, 1) and torch.equal(held_out.seeds, eval_seeds(0, 4, 1))
    assert held_out.scorer is not None and held_out.scorer.names == ["dlib_lmd"]  # psnr is a trained reward
    scores = {
        "sharpness": torch.tensor([1.0, 3.0]),
        "psnr": torch.tensor([20.0, 22.0]),
        "dlib_lmd": torch.tensor([-0.125, math.nan]),  # as rewards report it: negated, NaN without a face
    }
    values = held_out.values(scores)
    assert values == {"total": 4.0, "reward/sharpness": 2.0, "reward/psnr": 21.0, "psnr": 21.0, "dlib_lmd": 0.125}


def test_bad_guard_and_eval_settings_are_refused_with_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stage2\.guard\.rules\.0\.metric = 'ssim' is not evaluated"):
        tiny_config(tmp_path, "stage2.guard.rules=[{metric: ssim, max_worse: 1}]")
    with pytest.raises(ConfigError, match=r"stage2\.guard\.action = 'explode': Input should be 'stop' or 'rollback'"):
        tiny_config(tmp_path, "stage2.guard.action=explode")
    with pytest.raises(ConfigError, match=r"stage2\.select\.metric = 'lpips' is not evaluated"):
        tiny_config(tmp_path, "stage2.select.metric=lpips")
    with pytest.raises(ConfigError, match=r"max_worse"):
        tiny_config(tmp_path, "stage2.guard.rules=[{metric: psnr, max_worse: -1}]")
    unknown = tiny_config(tmp_path, "stage2.eval_every=5", "stage2.eval.guard_metrics=[no_such_metric]")
    with pytest.raises(ConfigError, match=r"stage2\.eval\.guard_metrics: unknown reward 'no_such_metric'"):
        check_stage2_inputs(unknown)
    no_faces = tiny_config(tmp_path, "stage2.eval_every=5", "data.holdout=0")
    with pytest.raises(ValueError, match=r"data\.holdout=0: hold some faces back"):
        check_stage2_inputs(no_faces)
    too_many = tiny_config(tmp_path, "stage2.eval_every=5", "stage2.eval.faces=9")
    with pytest.raises(ValueError, match=r"stage2\.eval\.faces=9 is more than data\.holdout=4"):
        check_stage2_inputs(too_many)


def test_pruning_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    policy = build_tiny_policy(0)
    for step in (2, 4, 6):
        best = [tmp_path / "checkpoints" / "stage2" / "step_000002"]
        save_checkpoint(tmp_path, "stage2", step, policy, {"step": step}, keep=1, protect=best)
    assert [step for step, _ in list_checkpoints(tmp_path, "stage2")] == [2, 6]


def test_held_out_restorations_use_the_lent_weights_and_give_them_back(setup: dict) -> None:  # noqa: F811
    worker = RolloutWorker(**setup)
    before = worker.velocity_state()
    trained = {key: value + 0.05 for key, value in before.items() if "proj_out" in key}
    seeds = eval_seeds(7, 3, 2)
    meta, images = worker.restore_holdout(WeightUpdate("full", trained), seeds, SAMPLER, batch_size=2)
    after = worker.velocity_state()
    assert all(torch.equal(after[key], before[key]) for key in before)  # the rollout weights are back
    assert images.images.shape == (3, 2, 3, 64, 64) and meta.candidates == 2 and len(meta.ids) == 3
    holding = RolloutWorker(**setup)
    holding.load_weights(1, WeightUpdate("full", trained))
    _, expected = holding.restore_holdout(WeightUpdate("full", trained), seeds, SAMPLER, batch_size=3)
    assert torch.equal(images.images, expected.images)  # batching does not change a restoration
    _, plain = worker.restore_holdout(WeightUpdate("full", {}), seeds, SAMPLER, batch_size=3)
    assert not torch.equal(plain.images, expected.images)
    # the faces are the held-back ones, degraded as the demo degrades them
    _, held = split_holdout(read_shards(Path(setup["shards"])), setup["holdout"])
    assert meta.ids == [record.id for record in held[:3]]
    clean = square_resize(held[0].image, 64)
    lq, _ = degrade_seeded(clean, worker.holdout.degradation, sample_seed(setup["data_seed"], held[0].id, 0))
    assert np.array_equal(images.lq[0].permute(1, 2, 0).numpy(), lq)
    with pytest.raises(ValueError, match="data.holdout keeps 4"):
        worker.restore_holdout(WeightUpdate("full", {}), eval_seeds(7, 5, 1), SAMPLER, batch_size=2)
