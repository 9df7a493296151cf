"""Determinism analysis (Fig. 8), the Stage 2 reward figure (Fig. 6) and captioned grids."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from rlrestore.data import embedded_faces_dir, load_image, save_image, square_resize
from rlrestore.orchestration.analysis import run_determinism, seed_spread, verdict
from rlrestore.orchestration.cli import main
from rlrestore.orchestration.cli_tools import default_config_path
from rlrestore.orchestration.evaluation import Metric
from rlrestore.orchestration.plotting import captioned_grid, plot_run, reward_figure
from rlrestore.tracking import MetricsWriter, read_metrics
from tests.conftest import build_tiny_policy, tiny_config

FEW_TOKENS = ("policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16")
FAST = (*FEW_TOKENS, "sampler.steps=2", "logging.progress=false", "eval.metrics=[psnr,piqe,fid]")
SEEDS = 4
PSNR = Metric("psnr", "PSNR", "dB", higher_is_better=True, needs_gt=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny checkpoints and a folder of 3 clean 64 px faces."""
    root = tmp_path_factory.mktemp("analysis")
    for name, seed in (("F", 0), ("Q", 1)):
        build_tiny_policy(seed, *FEW_TOKENS).save_pretrained(root / name)
    for path in sorted(embedded_faces_dir().glob("*.png"))[:3]:
        save_image(square_resize(load_image(path), 64), root / "faces" / path.name)
    return root


def test_stochastic_sampler_spreads_over_seeds(models, capsys):
    out = models / "stochastic"
    argv = ["analyze", "determinism", str(default_config_path()), "--ckpt", f"F={models / 'F'}"]
    argv += ["--ckpt", f"Q={models / 'Q'}", "--data", str(models / "faces"), "--out", str(out)]
    assert main([*argv, "--seeds", str(SEEDS), "--quiet", *FAST]) == 0

    printed = capsys.readouterr().out
    payload = json.loads((out / "determinism.json").read_text())
    assert payload["seeds"] == list(range(SEEDS)) and payload["noise_seed"] is None
    assert [row["model"] for row in payload["median_std"]] == ["F", "Q"]
    assert all(row["psnr"] > 0 and row["piqe"] > 0 for row in payload["median_std"])
    assert "fid" not in payload["median_std"][0]  # set-level: no per-input spread
    line = payload["verdicts"][0]
    assert re.fullmatch(r"Q's median PSNR std is [\d.]+ dB, \d+% (lower|higher) than F's [\d.]+ dB", line)
    assert line in printed
    spread = pd.read_csv(out / "determinism_spread.csv")
    assert list(spread.columns) == ["model", "image", "psnr", "piqe"] and len(spread) == 2 * 3
    per_image = pd.read_parquet(out / "per_image.parquet")
    expected = per_image.groupby(["model", "image"], sort=False)[["psnr", "piqe"]].std(ddof=1).reset_index()
    pd.testing.assert_frame_equal(spread, expected, check_exact=False, rtol=1e-9)
    with open(out / "determinism.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    restored = sorted((out / "restored" / "F").glob(f"{spread['image'][0]}_s*.png"))
    assert len(restored) == SEEDS and len({path.read_bytes() for path in restored}) == SEEDS


def test_fixed_noise_is_a_deterministic_sampler_with_zero_spread(models):
    config = tiny_config(models / "run", *FAST, "eval.noise_seed=7", "sampler.sde_eta=0.5")
    checkpoints = [f"F={models / 'F'}", f"Q={models / 'Q'}"]
    report = run_determinism(
        config, checkpoints, models / "faces", models / "fixed", seeds=SEEDS, progress=False
    )

    assert (report.spread[["psnr", "piqe"]] == 0).all().all()
    assert (report.medians[["psnr", "piqe"]] == 0).all().all()
    assert report.verdicts[0] == "Q and F both have a median PSNR std of 0 (deterministic)"
    image = report.spread["image"][0]
    restored = sorted((models / "fixed" / "restored" / "Q").glob(f"{image}_s*.png"))
    assert len(restored) == SEEDS and len({path.read_bytes() for path in restored}) == 1


def test_seed_spread_is_exactly_zero_for_equal_values_and_the_sample_std_otherwise():
    values = [0.1, 0.1, 0.1, 1 / 3, 2 / 3, 5.0]
    table = pd.DataFrame(
        {"model": ["F"] * 6, "image": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "x": values}
    )
    spread = seed_spread(table, ["x"])
    assert spread["x"][0] == 0.0
    assert spread["x"][1] == pytest.approx(np.std(values[3:], ddof=1), rel=1e-12)


@pytest.mark.parametrize(
    ("base", "other", "expected"),
    [
        (1.10, 0.41, "Q's median PSNR std is 0.4100 dB, 63% lower than F's 1.1000 dB"),
        (0.5, 0.75, "Q's median PSNR std is 0.7500 dB, 50% higher than F's 0.5000 dB"),
        (0.0, 0.2, "Q's median PSNR std is 0.2000 dB, above F's 0 (deterministic)"),
        (0.0, 0.0, "Q and F both have a median PSNR std of 0 (deterministic)"),
    ],
)
def test_verdict(base, other, expected):
    assert verdict(PSNR, "F", base, "Q", other) == expected


def test_stage2_rewards_are_drawn_on_two_axes_fig6(tmp_path):
    with MetricsWriter(tmp_path, "stage2") as writer:
        for step in range(12):
            writer.log(
                {
                    "reward/sharpness/mean": 10.0 + step,
                    "reward/psnr/mean": 20.0 - 0.1 * step,
                    "reward/total/mean": 10.0 + step,
                    "reward/nonfinite/psnr": 0.0,
                    "reward/r_mean": 0.5,
                    "learn/loss": 1.0,
                },
                step=step,
            )
    with MetricsWriter(tmp_path, "stage1.1") as writer:
        for step in range(5):
            writer.log({"loss": 1.0 / (step + 1), "diff_loss": 0.5, "ce_loss": 2.0}, step=step)

    paths = plot_run(tmp_path)

    assert [path.name for path in paths] == ["stage1.1.png", "stage2.png", "stage2_rewards.png"]
    figure = reward_figure(read_metrics(tmp_path, "stage2"))
    left, right = figure.axes
    assert [line.get_label() for line in left.get_lines() if not line.get_label().startswith("_")] == [
        "total reward"
    ]
    assert [line.get_label() for line in right.get_lines() if not line.get_label().startswith("_")] == [
        "sharpness",
        "psnr",
    ]
    assert "total" in left.get_ylabel() and "components" in right.get_ylabel()
    assert left.get_shared_x_axes().joined(left, right)  # one step axis, two y axes
    with pytest.raises(ValueError, match="reward/total/mean"):
        reward_figure(read_metrics(tmp_path, "stage1.1"))


def test_captioned_grid_fits_any_size_into_cells():
    red = np.zeros((30, 60, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = 255
    grid = captioned_grid([[red, blue], [blue, red]], ["LQ", "F"], ["a", "bb"], cell=64)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    assert (grid[-64 + 16 : -16, -64:] == red[0, 0]).all()  # 60x30 scaled to 64x32, centred vertically
    assert (grid[-130:-66, -64:] == blue[0, 0]).all()
    with pytest.raises(ValueError, match="2 rows of 2 images"):
        captioned_grid([[red]], ["LQ", "F"], ["a", "b"], cell=64)
