"""``rlrestore eval``: the summary table, metric values against pyiqa called directly, skipped metrics
with reasons, real sets, resuming, Ray actors against the in-process path, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from rewards import Reward, RewardBatch
from rlrestore.config import DEFAULT_EVAL_METRICS
from rlrestore.data import (
    degrade_seeded,
    embedded_faces_dir,
    load_image,
    save_image,
    square_resize,
)
from rlrestore.orchestration.cli import main
from rlrestore.orchestration.cli_tools import default_config_path
from rlrestore.orchestration.evaluation import format_value, run_evaluation
from rlrestore.runtime.seeds import sample_seed
from tests.conftest import build_tiny_policy, tiny_config

# 16 px SigLIP input (16 semantic tokens) and 2 sampler steps keep a restoration at a few ms.
FEW_TOKENS = ("policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16")
FAST = (*FEW_TOKENS, "sampler.steps=2", "eval.chunk_size=2", "logging.progress=false")
FACES = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    """Two tiny checkpoints (F, Q) and a folder of 4 clean 64 px faces plus one unreadable file."""
    root = tmp_path_factory.mktemp("eval")
    for name, seed in (("F", 0), ("Q", 1)):
        build_tiny_policy(seed, *FEW_TOKENS).save_pretrained(root / name)
    data = root / "faces"
    faces = sorted(embedded_faces_dir().glob("*.png"))[:FACES]
    for path in faces:
        save_image(square_resize(load_image(path), 64), data / path.name)
    (data / "broken.png").write_text("not an image\n")
    return SimpleNamespace(
        root=root,
        data=data,
        ids=[path.stem for path in faces],
        ckpts=[f"F={root / 'F'}", f"Q={root / 'Q'}"],
    )


@pytest.fixture(scope="module")
def synthetic(setup) -> Path:
    """``rlrestore eval`` of F and Q on the synthetic set, default metrics, through the CLI."""
    out = setup.root / "synthetic"
    argv = ["eval", str(default_config_path()), "--data", str(setup.data), "--out", str(out), "--quiet"]
    for ckpt in setup.ckpts:
        argv += ["--ckpt", ckpt]
    assert main([*argv, *FAST]) == 0  # overrides after the options reach the config
    return out


def _unit(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0  # as the rewards feed pyiqa


def test_summary_has_one_row_per_checkpoint_with_directions_and_best_marked(synthetic, setup):
    summary = pd.read_csv(synthetic / "summary.csv")
    # metrics with no weights or offline weights are computed; every other default metric lacks weights here (skipped)
    assert list(summary.columns) == [
        "model",
        "images",
        "restorations",
        "psnr↑",
        "ssim↑",
        "ms_ssim↑",
        "niqe↓",
        "brisque↓",
        "piqe↓",
        "dlib_identity↓",
        "dlib_lmd↓",
        "best",
    ]
    assert summary["model"].tolist() == ["input", "F", "Q"]  # the degraded input first: the baseline
    assert summary["images"].tolist() == [FACES] * 3 and summary["restorations"].tolist() == [FACES] * 3

    per_image = pd.read_parquet(synthetic / "per_image.parquet")
    assert list(per_image.columns) == [
        "model",
        "image",
        "seed",
        "psnr",
        "ssim",
        "ms_ssim",
        "niqe",
        "brisque",
        "piqe",
        "dlib_identity",
        "dlib_lmd",
    ]
    assert per_image["image"].tolist() == setup.ids * 3 and set(per_image["seed"]) == {0}
    assert per_image["model"].tolist() == [model for model in ("input", "F", "Q") for _ in setup.ids]
    means = per_image.groupby("model")[["psnr", "ssim", "piqe"]].mean().reindex(summary["model"])
    np.testing.assert_allclose(summary[["psnr↑", "ssim↑", "piqe↓"]].to_numpy(), means.to_numpy(), rtol=1e-12)
    assert per_image["psnr"].nunique() == len(per_image)  # the input and two checkpoints, four faces

    checkpoints = summary[summary["model"] != "input"]  # the input row is never best
    best_psnr = checkpoints.loc[checkpoints["psnr↑"].idxmax(), "model"]
    best_piqe = checkpoints.loc[checkpoints["piqe↓"].idxmin(), "model"]  # PIQE: lower is better
    best = dict(zip(summary["model"], summary["best"].fillna("").str.split(";"), strict=True))
    assert best["input"] == [""]
    assert "psnr" in best[best_psnr] and "psnr" not in best[({"F", "Q"} - {best_psnr}).pop()]
    assert "piqe" in best[best_piqe] and "piqe" not in best[({"F", "Q"} - {best_piqe}).pop()]
    unscored = ("ms_ssim", "niqe")  # no value, no best
    assert not any(key in entries for entries in best.values() for key in unscored)

    markdown = (synthetic / "summary.md").read_text()
    assert (
        "| model | images | PSNR (dB) ↑ | SSIM ↑ | MS-SSIM ↑ | NIQE ↓ | BRISQUE ↓ | PIQE ↓ | "
        "dlib identity distance ↓ | dlib LMD (× inter-ocular) ↓ |"
    ) in markdown
    assert f"**{format_value(checkpoints['psnr↑'].max())}**" in markdown
    assert f"**{format_value(checkpoints['piqe↓'].min())}**" in markdown
    input_row = next(line for line in markdown.splitlines() if line.startswith("| input |"))
    assert "**" not in input_row and "`input`: the degraded input itself" in markdown
    assert "input" not in json.loads((synthetic / "summary.json").read_text())["models"]


def test_every_metric_is_computed_or_skipped_with_its_reason(synthetic, setup):
    payload = json.loads((synthetic / "summary.json").read_text())
    computed = [metric["key"] for metric in payload["metrics"]]
    skipped = payload["skipped_metrics"]
    assert computed == ["psnr", "ssim", "ms_ssim", "niqe", "brisque", "piqe", "dlib_identity", "dlib_lmd"]
    assert sorted(computed + list(skipped)) == sorted(DEFAULT_EVAL_METRICS)
    assert all(reason.strip() for reason in skipped.values())
    assert skipped["fid"].startswith("weights missing: FID Inception-v3") and "pt_inception" in skipped["fid"]
    assert skipped["deg"].startswith("weights missing: ArcFace")
    assert "landmark" in skipped["lmd"]
    markdown = (synthetic / "summary.md").read_text()
    skipped_section = markdown.split("## Skipped metrics")[1]
    assert all(f"- `{key}`: " in skipped_section for key in skipped)
    # MS-SSIM needs 161 px, NIQE 96 px: the 64 px faces are left unscored and the summary says so
    for metric, side in (("ms_ssim", 161), ("niqe", 96)):
        assert any(
            note["metric"] == metric and f"{side} px" in note["reason"] and note["images"] == FACES
            for note in payload["notes"]
        )
    broken = {"path": str(setup.data / "broken.png"), "reason": "not a recognised image format"}
    assert payload["skipped_inputs"] == [broken]
    assert f"- {broken['path']}: {broken['reason']}" in markdown


def test_psnr_and_ssim_agree_with_pyiqa_called_directly(synthetic, setup):
    import pyiqa

    config = tiny_config("unused")
    psnr = pyiqa.create_metric("psnr", device="cpu", as_loss=False)
    ssim = pyiqa.create_metric("ssim", device="cpu", as_loss=False)
    per_image = pd.read_parquet(synthetic / "per_image.parquet")
    for row in per_image.itertuples():
        clean = load_image(setup.data / f"{row.image}.png")
        gt = load_image(synthetic / "inputs" / "gt" / f"{row.image}.png")
        lq = load_image(synthetic / "inputs" / "lq" / f"{row.image}.png")
        # the ground truth is the clean face; the input is Eq. 16 seeded by (eval.seed, id)
        assert np.array_equal(gt, clean)
        degraded, _ = degrade_seeded(clean, config.degradation, sample_seed(0, row.image, 0))
        assert np.array_equal(lq, degraded)
        output = load_image(synthetic / "restored" / row.model / f"{row.image}_s{row.seed}.png")
        assert np.array_equal(output, lq) == (row.model == "input")  # the input row scores the LQ face
        restored = _unit(output)
        assert row.psnr == pytest.approx(float(psnr(restored, _unit(gt))), rel=1e-6)
        assert row.ssim == pytest.approx(float(ssim(restored, _unit(gt))), rel=1e-6, abs=1e-9)


def test_comparison_grid_shows_lq_each_checkpoint_and_gt(synthetic, setup):
    grid = load_image(synthetic / "grid.png")
    assert grid.shape[0] > FACES * 64 and grid.shape[1] > 4 * 64  # 4 rows; LQ | F | Q | GT plus captions
    last = setup.ids[-1]
    assert np.array_equal(grid[-64:, -64:], load_image(synthetic / "inputs" / "gt" / f"{last}.png"))
    assert np.array_equal(grid[-64:, -130:-66], load_image(synthetic / "restored" / "Q" / f"{last}_s0.png"))


def test_real_set_skips_full_reference_metrics(synthetic, setup):
    config = tiny_config(setup.root / "run", *FAST, "eval.metrics=[psnr,ssim,lpips,deg,fid,piqe]")
    report = run_evaluation(
        config, setup.ckpts[:1], synthetic / "inputs" / "lq", setup.root / "real", real=True, progress=False
    )
    assert [metric.key for metric in report.metrics] == ["piqe"]
    for key in ("psnr", "ssim", "lpips", "deg"):
        assert "a real set has no ground truth" in report.skipped_metrics[key]
    assert "--reference" in report.skipped_metrics["fid"]
    assert list(report.per_image.columns) == ["model", "image", "seed", "piqe"]
    assert report.per_image["piqe"].notna().all() and report.grid is None
    assert not (setup.root / "real" / "inputs" / "gt").exists()


class Unscorable(Reward):
    """A plugin reward (named by ``module:Class`` path) that fails on every batch."""

    def score(self, images: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        raise ValueError("cannot score these faces")


def test_small_images_are_upscaled_on_request_and_a_failing_metric_is_reported(setup):
    failing = "tests.test_eval:Unscorable"
    config = tiny_config(
        setup.root / "run", *FAST, f"eval.metrics=[ms_ssim,'{failing}']", "eval.upscale_small=true"
    )
    report = run_evaluation(config, setup.ckpts[:1], setup.data, setup.root / "upscaled", progress=False)

    values = report.per_image["ms_ssim"]
    assert values.between(0, 1).all()  # 64 px faces, scored after a bicubic upscale to 161 px
    assert report.per_image[failing].isna().all()
    notes = {note["metric"]: note for note in report.notes}
    assert notes["ms_ssim"]["reason"].startswith(
        "upscaled (bicubic, GT alike) from 64 px to its minimum side of 161"
    )
    assert notes[failing]["reason"] == "scoring failed (ValueError: cannot score these faces)"
    assert notes[failing]["images"] == FACES
    assert f"`{failing}`: scoring failed" in (setup.root / "upscaled" / "summary.md").read_text()


def test_resume_recomputes_only_missing_or_damaged_chunks(setup):
    config = tiny_config(setup.root / "run", *FAST, "eval.chunk_size=1", "eval.metrics=[psnr,piqe]")
    out = setup.root / "resume"
    first = run_evaluation(config, setup.ckpts[:1], setup.data, out, progress=False)
    assert first.computed == [(model, index) for model in ("input", "F") for index in range(FACES)]
    assert first.reused == []
    parts = sorted((out / "parts" / "F").glob("chunk-*.parquet"))
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}
    parts[1].unlink()
    data = parts[2].read_bytes()
    parts[2].write_bytes(data[: len(data) // 2])  # cut short, as by a crash during a copy

    second = run_evaluation(config, setup.ckpts[:1], setup.data, out, progress=False)

    assert second.computed == [("F", 1), ("F", 2)]
    assert second.reused == [*(("input", index) for index in range(FACES)), ("F", 0), ("F", 3)]
    for index in (0, 3):  # untouched: neither the part nor the restoration was rewritten
        image = out / "restored" / "F" / f"{setup.ids[index]}_s0.png"
        assert parts[index].stat().st_mtime_ns == stamps[parts[index]]
        assert image.stat().st_mtime_ns == stamps[image]
    pd.testing.assert_frame_equal(second.per_image, first.per_image, check_exact=True)
    pd.testing.assert_frame_equal(second.summary, first.summary, check_exact=True)

    with pytest.raises(ValueError, match=r"other settings \(eval differ"):
        run_evaluation(
            tiny_config(
                setup.root / "run", *FAST, "eval.chunk_size=1", "eval.metrics=[psnr,piqe]", "eval.samples=2"
            ),
            setup.ckpts[:1],
            setup.data,
            out,
            progress=False,
        )


def test_ray_actors_give_the_same_table_as_in_process(synthetic, setup, ray_cluster):
    config = tiny_config(setup.root / "run", *FAST, "eval.actors.num_actors=2", "eval.actors.num_cpus=0.5")
    out = setup.root / "ray"
    report = run_evaluation(config, setup.ckpts, setup.data, out, progress=False)
    assert len(report.computed) == 6  # the input and 2 checkpoints x 2 chunks, on 2 actors
    pd.testing.assert_frame_equal(
        report.per_image, pd.read_parquet(synthetic / "per_image.parquet"), check_exact=True
    )
    for path in sorted((synthetic / "restored").rglob("*.png")):
        assert (out / path.relative_to(synthetic)).read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_ckpt", "does not exist"),
        ("empty_data", "holds no readable image (0 file(s) skipped)"),
        ("unreadable_only", "broken.png: not a recognised image format"),
        ("missing_data", "does not exist or is not a directory"),
        ("unknown_metric", "unknown reward 'psnrr'"),
        ("bad_metric_args", "bad args {'colour': 1}"),
        ("reserved_name", "'input' is the degraded input's row"),
    ],
)
def test_bad_input_is_a_clear_error(setup, tmp_path, capsys, case, expected):
    data, ckpt, overrides = setup.data, setup.ckpts[0], []
    if case == "missing_ckpt":
        ckpt = str(tmp_path / "no_such_run")
    elif case == "empty_data":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "unreadable_only":
        data = tmp_path / "broken"
        data.mkdir()
        (data / "broken.png").write_bytes((setup.data / "broken.png").read_bytes())
    elif case == "missing_data":
        data = tmp_path / "nowhere"
    elif case == "reserved_name":
        ckpt = f"input={setup.root / 'F'}"
    elif case == "unknown_metric":
        overrides = ["eval.metrics=[psnr,psnrr]"]
    else:
        overrides = ["eval.metrics=[psnr]", "eval.metric_args.psnr.colour=1"]
    argv = [
        "eval",
        str(default_config_path()),
        "--ckpt",
        ckpt,
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--quiet", *FAST, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlrestore: error: ") and expected in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "summary.csv")


def test_a_run_directory_brings_its_own_config(setup, tmp_path, capsys):
    """``eval RUN_DIR`` reads RUN_DIR/config.yaml and evaluates the run's latest checkpoint; a bare
    ``--ckpt`` inside a run finds the same config; with neither there is a clear error."""
    import shutil

    from rlrestore.config import load_config, save_config

    run = tmp_path / "run"
    step = run / "checkpoints" / "stage1.2" / "step_000002"
    shutil.copytree(setup.root / "F", step / "policy")
    (step / "trainer_state.pt").write_bytes(b"")
    save_config(load_config(default_config_path(), [*FAST, "eval.metrics=[psnr]"]), run / "config.yaml")
    options = ["--data", str(setup.data), "--quiet"]
    assert main(["eval", str(run), *options, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", "--ckpt", f"F={step}", *options, "--out", str(tmp_path / "b")]) == 0
    for out in ("a", "b"):  # only the run's metric: its config was read
        summary = pd.read_csv(tmp_path / out / "summary.csv")
        assert list(summary.columns) == ["model", "images", "restorations", "psnr↑", "best"]
    a, b = (pd.read_parquet(tmp_path / out / "per_image.parquet") for out in ("a", "b"))
    np.testing.assert_allclose(a["psnr"].to_numpy(), b["psnr"].to_numpy())
    capsys.readouterr()

    assert main(["eval", "--ckpt", str(setup.root / "F"), *options, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no config.yaml in" in err and "pass a config file" in err
    assert main(["eval", str(default_config_path()), *options, "--out", str(tmp_path / "d")]) == 2
    assert "give --ckpt" in capsys.readouterr().err
