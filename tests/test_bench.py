"""`rlrestore bench`: the report has every figure as positive finite numbers (speed is not asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlrestore.orchestration.bench import format_report, run_bench
from rlrestore.orchestration.cli import main
from tests.conftest import tiny_config

SMALL = (
    "stage2.inputs_per_step=2",
    "stage2.candidates=2",
    "stage2.rollout.batch_size=1",
    "stage2.rollout.sampler_steps=2",
    "stage2.learner.micro_batch=2",
    "stage2.nft.timesteps_per_sample=1",
)
FIGURE_KEYS = {"unit", "ours", "baseline", "ratio", "ratio_means", "settings"}


def check_figure(figure: dict) -> None:
    assert FIGURE_KEYS <= set(figure)
    for key in ("ours", "baseline", "ratio"):
        assert math.isfinite(figure[key]) and figure[key] > 0, (key, figure[key])


def test_rollout_and_learner_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    report = run_bench(tiny_config(tmp_path / "run", *SMALL), out, repeats=1, parts=["rollout", "learner"])
    assert json.loads(out.read_text()) == report
    assert {"device", "torch_threads", "repeats", "rollout", "learner"} <= set(report)
    assert "stage2" not in report
    check_figure(report["rollout"])
    check_figure(report["learner"])
    settings = report["rollout"]["settings"]
    assert (settings["inputs"], settings["candidates"], settings["steps"]) == (1, 2, 2)
    # the diffusers baseline samples the same model on the same grid: the same latents
    assert report["rollout"]["settings"]["max_abs_latent_difference"] < 1e-4
    assert report["learner"]["settings"]["forward_backward_passes"] == 2
    for name in ("rollout", "learner"):  # achieved FLOP/s against this machine's matmul rate
        settings = report[name]["settings"]
        assert settings["flops"] > 0 and 0 < settings["matmul_fraction"] < 2, settings
    assert "rollout" in format_report(report)


def test_the_medium_size_is_a_dit_of_tens_of_millions_of_parameters_at_128_px() -> None:
    import torch

    from rlrestore.orchestration.bench import SIZES
    from rlrestore.policies.prefrestore import PrefRestorePolicy

    config = tiny_config("unused", *SIZES["medium"])
    with torch.device("meta"):
        policy = PrefRestorePolicy.from_config(config.policy)
    parameters = sum(param.numel() for param in policy.transformer.parameters())
    assert 20e6 < parameters < 80e6 and config.policy.resolution == 128


def test_flop_counting_counts_a_matmul() -> None:
    import torch

    from rlrestore.orchestration.bench import count_flops, matmul_flops_per_second

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    # a depthwise convolution's backward costs two forwards, not two dense convolutions
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    forward = count_flops(lambda: conv(x))
    assert forward == 2 * 8 * 9 * 16 * 16
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward
    assert matmul_flops_per_second(torch.device("cpu"), n=128) > 1e6


def test_cli_rejects_an_unknown_part(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--out", str(tmp_path / "b.json"), "--only", "nothing"])
    assert "invalid choice" in capsys.readouterr().err


def test_reward_throughput_through_the_cli(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no --out: bench.json in the working directory
    out = tmp_path / "bench.json"
    rewards = "sharpness,clipscore,no_such_reward"  # weight-free, tiny CLIP model, a typo
    sizes = ["--reward-images", "4", "--reward-size", "32", "--repeats", "1"]
    assert main(["bench", "--only", "rewards", "--rewards", rewards, *sizes]) == 0
    report = json.loads(out.read_text())
    assert {"rollout", "learner", "stage2"}.isdisjoint(report)
    section = report["rewards"]
    assert section["settings"] == {"images": 4, "size": 32, "candidates_per_caption": 4}
    assert list(section["figures"]) == ["sharpness", "clipscore"]
    for figure in section["figures"].values():
        check_figure(figure)
        assert figure["unit"] == "images/s" and figure["settings"]["batch_size"] == 32
    assert section["figures"]["clipscore"]["settings"]["weights"] == "tiny random"
    assert section["skipped"].keys() == {"no_such_reward"}
    assert "unknown reward 'no_such_reward'" in section["skipped"]["no_such_reward"]
    table = capsys.readouterr().out
    assert "batched img/s" in table and "clipscore" in table and "no_such_reward   skipped" in table


@pytest.mark.slow
def test_stage2_figure_on_ray(tmp_path: Path, ray_cluster) -> None:
    overrides = (
        *SMALL,
        "stage2.resources.learner.num_actors=1",
        "stage2.resources.rollout.num_actors=1",
        "stage2.learner.zero_stage=0",
    )
    report = run_bench(
        tiny_config(tmp_path / "run", *overrides), tmp_path / "bench.json", repeats=1, parts=["stage2"]
    )
    for name in ("stage2", "stage2_driver_bytes", "stage2_async"):
        check_figure(report[name])
    assert report["stage2"]["settings"]["learner_ranks"] == 1
    # the data plane moves far fewer bytes through the driver than relaying the rollouts would
    moved = report["stage2_driver_bytes"]
    assert moved["ratio"] < 0.05, moved
    direct = moved["settings"]["data_plane"]
    assert direct["rollout/bytes"] >= 100 * direct["driver/bytes_in"]
    assert direct["sync/bytes"] > 0 and moved["settings"]["driver_relay"]["sync/bytes"] == direct["sync/bytes"]
    assert "stage2_driver_bytes" in format_report(report)
