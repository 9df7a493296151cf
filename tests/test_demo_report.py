"""The demo's checks: F against the input, Q against F on the trained reward, the dial's trend."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest

from rlrestore.config import load_config
from rlrestore.orchestration.demo import DEMO_CONFIG, DEMO_POLICY, with_demo_policy
from rlrestore.orchestration.demo_report import comparison_checks, dial_checks
from rlrestore.orchestration.evaluation.metrics import Metric

PSNR = Metric("psnr", "PSNR", "dB", higher_is_better=True, needs_gt=True)
IDENTITY = Metric("dlib_identity", "dlib identity", "", higher_is_better=False, needs_gt=True)
BRISQUE = Metric("brisque", "BRISQUE", "", higher_is_better=False, needs_gt=False)


def control_with(rows: dict[str, dict[str, float]]) -> SimpleNamespace:
    summary = pd.DataFrame([{"model": name, **values} for name, values in rows.items()])
    return SimpleNamespace(evaluation=SimpleNamespace(summary=summary, metrics=[PSNR, IDENTITY, BRISQUE]))


def test_comparison_checks_follow_each_metric_direction() -> None:
    control = control_with(
        {
            "input": {"psnr": 20.0, "dlib_identity": 0.5, "brisque": 60.0},
            "F": {"psnr": 21.0, "dlib_identity": 0.6, "brisque": 50.0},
            "Q": {"psnr": 19.0, "dlib_identity": 0.7, "brisque": 40.0},
        }
    )
    checks = {check.claim: check for check in comparison_checks(control, ["brisque"])}
    assert checks["F beats the degraded input on psnr"].holds
    assert not checks["F beats the degraded input on dlib_identity"].holds  # a larger distance is worse
    q_check = checks["Q beats F on brisque (trained)"]
    assert q_check.holds and (q_check.before, q_check.after) == (50.0, 40.0)


def test_comparison_checks_use_the_best_checkpoint_row_when_named() -> None:
    control = control_with(
        {
            "input": {"psnr": 20.0, "dlib_identity": 0.5, "brisque": 60.0},
            "F": {"psnr": 21.0, "dlib_identity": 0.4, "brisque": 50.0},
            "Q": {"psnr": 15.0, "dlib_identity": 0.9, "brisque": 30.0},
            "Q_best": {"psnr": 20.0, "dlib_identity": 0.5, "brisque": 55.0},
        }
    )
    checks = {check.claim: check for check in comparison_checks(control, ["brisque"])}
    assert not checks["Q_best beats F on brisque (trained)"].holds  # 55 is worse than F's 50


def dial_with(values: list[float]) -> SimpleNamespace:
    rows = [
        {"model": "Q", "s": s, "brisque": v} for s, v in zip([0, 0.25, 0.5, 0.75, 1.0], values, strict=True)
    ]
    return SimpleNamespace(metrics=[PSNR, BRISQUE], dial=list(reversed(rows)))


@pytest.mark.parametrize(
    ("values", "monotone"),
    [
        ([60, 55, 50, 45, 40], True),
        ([60, 55, 56, 45, 40], False),
        ([60, 60, 50, 45, 40], True),
        ([60, 55, math.nan, 45, 40], False),
    ],
)
def test_dial_check_wants_a_monotone_trend_in_the_better_direction(
    values: list[float], monotone: bool
) -> None:
    (check,) = dial_checks(dial_with(values), ["brisque"])
    assert check.holds is monotone
    assert check.before == 60


def test_demo_config_starts_from_the_shipped_policy() -> None:
    config = with_demo_policy(load_config(DEMO_CONFIG, []))
    assert config.policy.checkpoint == str(DEMO_POLICY)
    assert (DEMO_POLICY / "policy_config.json").is_file()
    given = with_demo_policy(load_config(DEMO_CONFIG, ["policy.checkpoint=/somewhere/else"]))
    assert given.policy.checkpoint == "/somewhere/else"
