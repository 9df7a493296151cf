"""The fidelity-quality dial (``restore --quality``, ``eval --quality``): weights F + s (Q - F), with
F the Stage 1.2 policy of the run and Q a fake Stage 2 policy (F with its DiT weights perturbed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from rlrestore.data import embedded_faces_dir, load_image, save_image, square_resize
from rlrestore.orchestration.cli import main
from rlrestore.orchestration.cli_tools import default_config_path
from rlrestore.policies import load_policy
from rlrestore.policies.blend import blend_velocity, stage2_tensor_names
from tests.conftest import build_tiny_policy

FEW_TOKENS = ("policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16")
RESTORE = ["--steps", "2", "--quiet", "--seed", "3"]


def _checkpoint(run_dir: Path, stage: str, step: int, policy: torch.nn.Module) -> Path:
    step_dir = run_dir / "checkpoints" / stage / f"step_{step:06d}"
    policy.save_pretrained(step_dir / "policy")
    torch.save({"step": step}, step_dir / "trainer_state.pt")
    return step_dir / "policy"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A run directory with a Stage 1.2 checkpoint (F) and a Stage 2 one (Q: F's DiT perturbed),
    and a folder of 2 faces at 64 px."""
    root = tmp_path_factory.mktemp("dial")
    policy = build_tiny_policy(0, *FEW_TOKENS)
    f_dir = _checkpoint(root / "run", "stage1.2", 10, policy)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in policy.velocity_model.transformer.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    q_dir = _checkpoint(root / "run", "stage2", 2, policy)
    faces = root / "faces"
    for path in sorted(embedded_faces_dir().glob("*.png"))[:2]:
        save_image(square_resize(load_image(path), 64), faces / path.name)
    return SimpleNamespace(root=root, run=root / "run", f=f_dir, q=q_dir, faces=faces)


def _restore(ckpt: Path, out: Path, faces: Path, *extra: str) -> list[np.ndarray]:
    assert main(["restore", "--ckpt", str(ckpt), "--out", str(out), *RESTORE, *extra, str(faces)]) == 0
    return [load_image(path) for path in sorted(out.glob("*.png"))]


def test_blend_is_f_at_0_q_at_1_and_the_midpoint_at_half(run):
    f, q = load_policy(run.f), load_policy(run.q)
    trained = stage2_tensor_names(q)
    assert trained and all(name.startswith("velocity_model.transformer.") for name in trained)
    state_f, state_q = f.state_dict(), q.state_dict()
    assert any(not torch.equal(state_f[name], state_q[name]) for name in trained)
    half = blend_velocity(load_policy(run.f), load_policy(run.q), 0.5).state_dict()
    for name, value in half.items():
        if name in trained and value.is_floating_point():
            torch.testing.assert_close(value, (state_f[name] + state_q[name]) / 2, rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, state_f[name]), name
    zero = blend_velocity(load_policy(run.f), load_policy(run.q), 0.0).state_dict()
    one = blend_velocity(load_policy(run.f), load_policy(run.q), 1.0).state_dict()
    assert all(torch.equal(zero[name], state_f[name]) for name in state_f)
    assert all(torch.equal(one[name], state_q[name]) for name in state_q)


def test_restore_at_0_is_f_at_1_is_q_and_between_is_neither(run, tmp_path, capsys):
    as_f = _restore(run.f, tmp_path / "f", run.faces)
    as_q = _restore(run.q, tmp_path / "q", run.faces)
    dial0 = _restore(run.run, tmp_path / "s0", run.faces, "--quality", "0")
    dial1 = _restore(run.run, tmp_path / "s1", run.faces)  # default s = 1: Q, no F needed
    dial_half = _restore(run.run, tmp_path / "s05", run.faces, "--quality", "0.5")
    assert len(as_f) == len(dial0) == len(dial_half) == 2
    for a, b in zip(dial0, as_f, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    for a, b in zip(dial1, as_q, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert any(not np.array_equal(a, b) for a, b in zip(as_f, as_q, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(dial_half, as_f, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(dial_half, as_q, strict=True))
    report = json.loads((tmp_path / "s05" / "restore_report.json").read_text())
    assert report["quality"] == 0.5 and report["base"] == str(run.f.resolve())


@pytest.mark.parametrize("value", ["1.5", "abc", "-0.1", "nan"])
def test_bad_quality_is_a_clear_cli_error(run, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["restore", "--ckpt", str(run.run), "--out", str(tmp_path / "o"), "--quality", value, str(run.faces)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"--quality {value!r}" in err and "[0, 1]" in err


def test_bad_quality_list_for_eval_is_a_clear_cli_error(run, tmp_path, capsys):
    argv = ["eval", str(default_config_path()), "--ckpt", str(run.run), "--data", str(run.faces)]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--out", str(tmp_path / "o"), "--quality", "0,2"])
    assert exited.value.code == 2
    assert "--quality '2' is outside [0, 1]" in capsys.readouterr().err


def test_missing_f_is_a_clear_error_and_base_supplies_it(run, tmp_path, capsys):
    alone = tmp_path / "q_alone"
    shutil.copytree(run.q, alone)
    args = ["--out", str(tmp_path / "o"), *RESTORE, "--quality", "0.5", str(run.faces)]
    assert main(["restore", "--ckpt", str(alone), *args]) == 2
    assert "its Stage 1 policy F cannot be found: pass F with --base" in capsys.readouterr().err
    # a run whose Stage 1.2 checkpoints were removed: the message names the folder looked in
    bare = tmp_path / "bare"
    shutil.copytree(run.run / "checkpoints" / "stage2", bare / "checkpoints" / "stage2")
    assert main(["restore", "--ckpt", str(bare), *args]) == 2
    err = capsys.readouterr().err
    assert str(bare.resolve() / "checkpoints" / "stage1.2") in err and "--base" in err
    assert main(["restore", "--ckpt", str(alone), "--base", str(run.f), *args]) == 0


def test_unrelated_policies_are_refused_naming_a_tensor(run, tmp_path, capsys):
    other = tmp_path / "other"
    build_tiny_policy(5, *FEW_TOKENS).save_pretrained(other)
    with pytest.raises(ValueError, match=r"F and Q differ in '(?!velocity_model\.transformer\.)[^']+'"):
        blend_velocity(load_policy(other), load_policy(run.q), 0.5)
    args = ["--out", str(tmp_path / "o"), *RESTORE, "--quality", "0.5", "--base", str(other), str(run.faces)]
    assert main(["restore", "--ckpt", str(run.run), *args]) == 2
    assert "a tensor Stage 2 does not train" in capsys.readouterr().err


def test_eval_sweep_has_a_row_per_s_equal_to_f_and_q_at_the_ends_and_a_curve(run, tmp_path, capsys):
    fast = [*FEW_TOKENS, "sampler.steps=2", "eval.metrics=[psnr,sharpness]", "logging.progress=false"]
    base = ["eval", str(default_config_path()), "--data", str(run.faces), "--quiet"]
    sweep = tmp_path / "sweep"
    assert main([*base, "--ckpt", f"Q={run.run}", "--out", str(sweep), "--quality", "0,0.5,1", *fast]) == 0
    plain = tmp_path / "plain"
    assert main([*base, "--ckpt", f"F={run.f}", "--ckpt", f"Q={run.q}", "--out", str(plain), *fast]) == 0
    summary = pd.read_csv(sweep / "summary.csv")
    assert summary["model"].tolist() == ["input", "Q@s=0", "Q@s=0.5", "Q@s=1"]  # the degraded input first
    swept = pd.read_parquet(sweep / "per_image.parquet").set_index(["model", "image", "seed"])
    reference = pd.read_parquet(plain / "per_image.parquet").set_index(["model", "image", "seed"])
    for dialled, model in (("Q@s=0", "F"), ("Q@s=1", "Q")):
        np.testing.assert_allclose(
            swept.loc[dialled, ["psnr", "sharpness"]].to_numpy(),
            reference.loc[model, ["psnr", "sharpness"]].to_numpy(),
            atol=1e-3,
        )
    assert not np.allclose(reference.loc["F", "psnr"], reference.loc["Q", "psnr"])
    assert (sweep / "quality_curve.png").is_file()
    result = json.loads((sweep / "summary.json").read_text())
    assert [(row["model"], row["s"]) for row in result["dial"]] == [("Q", 0.0), ("Q", 0.5), ("Q", 1.0)]
    assert all(np.isfinite(row["sharpness"]) for row in result["dial"])
    assert "F=" + str(run.f.resolve()) in result["models"]["Q@s=0.5"]
    assert result["quality_curve_axes"] == ["psnr", "sharpness"]  # sharpness: the tiny config's trained reward
    markdown = (sweep / "summary.md").read_text()
    assert "## Fidelity-quality dial" in markdown and "| Q | 0.5 |" in markdown
    assert "quality curve  :" in capsys.readouterr().out
