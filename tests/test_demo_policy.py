"""The pretrained tiny demo policy (``rlrestore/assets/demo_policy``): it loads as ``policy.checkpoint``,
and restoring a held-back face through ``rlrestore restore``'s code path on the CPU reproduces the
PSNR its ``demo_policy_figures.json`` (``scripts/pretrain_demo_policy.py``) records for that face."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlrestore.checkpoints import configured_policy_dir
from rlrestore.config import load_config
from rlrestore.data import degrade_seeded, read_shards, save_image, split_holdout, square_resize
from rlrestore.orchestration.jobs import prepare_shards
from rlrestore.orchestration.restore import restore_files
from rlrestore.runtime.seeds import sample_seed

ROOT = Path(__file__).resolve().parents[1]
DEMO_POLICY = ROOT / "rlrestore" / "assets" / "demo_policy"
DEMO_CONFIG = ROOT / "rlrestore" / "configs" / "demo_pretrain.yaml"
DEMO_RUN_CONFIG = ROOT / "rlrestore" / "configs" / "demo.yaml"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


@pytest.fixture(scope="module")
def figures() -> dict:
    return json.loads((DEMO_POLICY.parent / "demo_policy_figures.json").read_text())


def test_the_asset_is_a_policy_checkpoint_of_the_pretrain_config_under_20_mb(figures: dict) -> None:
    assert configured_policy_dir(str(DEMO_POLICY)) == DEMO_POLICY
    size = sum(f.stat().st_size for f in DEMO_POLICY.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    meta = json.loads((DEMO_POLICY / "policy_config.json").read_text())
    config = load_config(DEMO_CONFIG, ["run_dir=unused"])
    assert meta["policy"]["resolution"] == config.policy.resolution == 64
    for key in ("z_low_injection", "flow_source", "source_noise"):
        assert meta["policy"][key] == getattr(config.policy, key), key
    for name in ("transformer", "vae"):
        assert meta["policy"][name]["arch"] == getattr(config.policy, name).arch, name
    assert figures["draws"][0]["faces"] == figures["draws"][1]["faces"]


def test_the_demo_config_repeats_the_pretrain_policy_section() -> None:
    """``demo.yaml`` trains Stage 2 and the control from the asset: its policy section (and the Stage 1.2
    recipe the control continues) must be the pretrain config's."""
    demo = load_config(DEMO_RUN_CONFIG, ["run_dir=unused"])
    pretrain = load_config(DEMO_CONFIG, ["run_dir=unused"])
    assert demo.policy == pretrain.policy
    for key in ("batch_size", "condition_dropout", "latent_weight", "diff_weight", "semantic_codes"):
        assert getattr(demo.stage1_2, key) == getattr(pretrain.stage1_2, key), key


def test_one_held_back_face_restores_on_the_cpu_as_recorded(figures: dict, tmp_path: Path) -> None:
    config = load_config(DEMO_CONFIG, [f"run_dir={tmp_path}", "logging.progress=false"])
    _, holdout = split_holdout(read_shards(prepare_shards(config)), config.data.holdout)
    draw = figures["draws"][0]
    assert [record.id for record in holdout] == draw["faces"]  # the demo's held-back faces
    record = holdout[0]
    clean = square_resize(record.image, config.policy.resolution)
    lq, _ = degrade_seeded(clean, config.degradation, sample_seed(draw["data_seed"], record.id, 0))
    save_image(lq, tmp_path / "lq" / f"{record.id}.png")
    restore_files(
        DEMO_POLICY, [tmp_path / "lq"], tmp_path / "out", config.sampler, seed=config.seed, progress=False,
        device="cpu",
    )  # fmt: skip
    restored = np.asarray(Image.open(tmp_path / "out" / f"{record.id}.png").convert("RGB"))
    assert restored.shape == clean.shape
    assert psnr(lq, clean) == pytest.approx(draw["input"]["psnr_per_face"][0], abs=1e-6)
    assert psnr(restored, clean) == pytest.approx(draw["F"]["psnr_per_face"][0], abs=0.05)
