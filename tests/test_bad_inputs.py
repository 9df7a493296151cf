"""Bad-input campaign: corrupt, truncated, empty, non-image, huge and tiny files, odd modes, bad
configs, missing or partial checkpoints and misbehaving rewards, fed to the data builder,
``rlrestore restore``, the trainers and the reward path. Each case must end in a clear error
(exit 2, one ``rlrestore: error:`` line, no traceback) or be skipped and reported, or be handled
(processed correctly); the outcomes are printed as one table at the end of the test run."""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from rewards import Reward, RewardAggregator, RewardBatch, RewardWorker
from rlrestore.checkpoints import list_checkpoints
from rlrestore.config import RewardSpec
from rlrestore.data import embedded_faces_dir
from rlrestore.orchestration.cli import main
from tests.campaign import ACCEPTED, record
from tests.conftest import build_tiny_policy

FEW_TOKENS = ("policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16")
HUGE = 8000


class Exploding(Reward):
    """A reward whose model fails on every batch."""

    def score(self, images: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        raise RuntimeError("CUDA error: device-side assert triggered (injected)")


def _noise(width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(width * height).integers(0, 256, shape, dtype=np.uint8)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_bad_files(folder: Path) -> dict[str, str]:
    """Every kind of input file the campaign feeds in; returns file name -> expected handling."""
    folder.mkdir(parents=True, exist_ok=True)
    png = _png(Image.fromarray(_noise(48, 48)))
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file with an image name\n")
    (folder / "script.webp").write_bytes(b"#!/bin/sh\necho hi\n")
    # 8000x8000 (64 MP) of one colour: a small file that decodes to 192 MB.
    Image.new("RGB", (HUGE, HUGE), (120, 90, 80)).save(folder / "huge.png")
    Image.fromarray(_noise(8, 8)).save(folder / "tiny.png")
    Image.fromarray(_noise(1, 1)).save(folder / "one_pixel.png")
    Image.fromarray(_noise(24, 24)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(_noise(24, 24, 1)).save(folder / "gray.png")
    Image.fromarray(_noise(24, 24, 4), mode="RGBA").save(folder / "alpha.png")
    Image.fromarray(_noise(24, 24)).convert("P").save(folder / "palette.png")
    Image.fromarray(_noise(24, 24, 1)).convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(_noise(24, 24, 1).astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    Image.fromarray(np.random.default_rng(1).random((24, 24), dtype=np.float32)).save(folder / "float.tiff")
    return {
        "truncated.png": "skip",
        "corrupt.jpg": "skip",
        "empty.png": "skip",
        "notes.png": "skip",
        "script.webp": "skip",
        "float.tiff": "skip",
        "huge.png": "process",
        "tiny.png": "process",
        "one_pixel.png": "process",
        "cmyk.jpg": "process",
        "gray.png": "process",
        "alpha.png": "process",
        "palette.png": "process",
        "gray_alpha.png": "process",
        "sixteen_bit.png": "process",
    }


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad") / "inputs"
    return folder, write_bad_files(folder)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy"
    build_tiny_policy(0, *FEW_TOKENS).save_pretrained(path)
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit code and stderr of ``rlrestore ARGV`` run in-process; an escaping exception is a crash."""
    capsys.readouterr()
    # Ray adds logging handlers bound to the stderr of the test that started it: point handlers
    # left on an earlier test's (closed) captured stderr at this test's.
    for logger in [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # setStream would flush the closed one
    try:
        code = main(argv)
    except BaseException as exc:  # noqa: BLE001 - the campaign reports crashes instead of stopping
        return -1, f"CRASH {type(exc).__name__}: {exc}"
    return code, capsys.readouterr().err


def classify(code: int, err: str) -> str:
    """A clear error exits 2 and ends with one ``rlrestore: error:`` message, with no traceback
    anywhere (log lines of what ran before the error may precede it)."""
    if code == 2 and "Traceback" not in err and error_message(err):
        return "clear error"
    return "CRASH"


def error_message(err: str) -> str:
    """The ``rlrestore: error:`` message of a failed command (it may span several lines)."""
    _, found, message = err.partition("rlrestore: error: ")
    return message.strip() if found else ""


def per_file_outcomes(
    area: str, expected: dict[str, str], skipped: dict[str, str], processed: set[str]
) -> None:
    for name, want in sorted(expected.items()):
        if name in skipped:
            entry = record(area, name, "skipped + reported", skipped[name])
        elif name in processed:
            entry = record(area, name, "handled", "processed")
        else:
            entry = record(area, name, "CRASH", "neither processed nor reported")
        assert entry.outcome == ("skipped + reported" if want == "skip" else "handled"), entry


def test_data_build_on_bad_files(bad_folder, tmp_path, capsys) -> None:
    folder, expected = bad_folder
    out = tmp_path / "shards"
    code, err = run_cli(
        ["data", "build", "--src", str(folder), "--out", str(out), "--size", "32", "--quiet"], capsys
    )
    assert code == 0, err
    report = json.loads((out / "_report.json").read_text())
    skipped = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    manifest = json.loads((out / "_manifest.json").read_text())
    processed = set(expected) - set(skipped) if manifest["count"] == len(expected) - len(skipped) else set()
    per_file_outcomes("data build", expected, skipped, processed)


def test_restore_on_bad_files(bad_folder, policy_dir, tmp_path, capsys) -> None:
    folder, expected = bad_folder
    out = tmp_path / "out"
    code, err = run_cli(
        ["restore", "--ckpt", str(policy_dir), "--out", str(out), "--steps", "1", "--quiet", str(folder)],
        capsys,
    )
    assert code == 0, err
    report = json.loads((out / "restore_report.json").read_text())
    skipped = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    processed = {Path(item["input"]).name for item in report["outputs"]}
    per_file_outcomes("restore", expected, skipped, processed)
    huge = next(item for item in report["outputs"] if Path(item["input"]).name == "huge.png")
    assert Image.open(out / huge["candidates"][0]["file"]).size == (HUGE, HUGE)  # back at the input size


def test_eval_on_bad_files(bad_folder, policy_dir, tmp_path, capsys) -> None:
    folder, expected = bad_folder
    out = tmp_path / "eval"
    code, err = run_cli(
        [
            "eval", "configs/tiny.yaml", "--ckpt", str(policy_dir), "--data", str(folder), "--out", str(out),
            "--quiet", "eval.metrics=[psnr,ssim,piqe]", "eval.batch_size=8",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    inputs = json.loads((out / "inputs.json").read_text())
    skipped = {Path(item["path"]).name: item["reason"] for item in inputs["skipped"]}
    scored = pd.read_parquet(out / "per_image.parquet")
    processed = {Path(item["source"]).name for item in inputs["inputs"] if item["id"] in set(scored["image"])}
    per_file_outcomes("eval", expected, skipped, processed)
    assert scored[["psnr", "ssim", "piqe"]].notna().all().all()


@pytest.mark.parametrize(
    ("case", "argv_tail", "named"),
    [
        ("wrong type", ["stage2.steps=many"], "stage2.steps"),
        ("out-of-range value", ["stage2.candidates=0"], "stage2.candidates"),
        ("unknown key", ["stage2.candidatez=4"], "candidatez"),
        ("bad choice", ["stage2.learner.finetune=qlora"], "stage2.learner.finetune"),
        ("malformed override", ["stage2.steps"], "key=value"),
        ("unknown reward", ["stage2.rewards=[{name: no_such_reward}]"], "no_such_reward"),
        ("reward arg that is not accepted", ["stage2.rewards=[{name: sharpness, args: {gain: 2}}]"], "gain"),
    ],
)
def test_bad_config_values(tmp_path, capsys, case, argv_tail, named) -> None:
    code, err = run_cli(["train", "stage2", "configs/tiny.yaml", f"run_dir={tmp_path}", *argv_tail], capsys)
    entry = record("config", case + f" ({argv_tail[0]})", classify(code, err), error_message(err) or err)
    assert entry.outcome == "clear error" and named in err, err


@pytest.mark.parametrize("case", ["not YAML", "YAML list", "missing file"])
def test_bad_config_files(tmp_path, capsys, case) -> None:
    path = tmp_path / "config.yaml"
    if case == "not YAML":
        path.write_text("stage2: {steps: [1,\n")
    elif case == "YAML list":
        path.write_text("- 1\n- 2\n")
    code, err = run_cli(["train", "stage2", str(path)], capsys)
    entry = record("config", case, classify(code, err), error_message(err) or err)
    assert entry.outcome == "clear error" and str(path) in err, err


def _partial_checkpoints(root: Path, policy_dir: Path) -> dict[str, Path]:
    cases = {}
    missing_weights = root / "no_dit_weights"
    shutil.copytree(policy_dir, missing_weights)
    for file in (missing_weights / "transformer").glob("*.safetensors"):
        file.unlink()
    cases["policy without DiT weights"] = missing_weights
    truncated = root / "truncated_weights"
    shutil.copytree(policy_dir, truncated)
    for file in (truncated / "vae").glob("*.safetensors"):
        file.write_bytes(file.read_bytes()[:100])
    cases["truncated VAE weights"] = truncated
    bad_json = root / "bad_config"
    shutil.copytree(policy_dir, bad_json)
    (bad_json / "policy_config.json").write_text('{"policy": {"dtype": ')
    cases["truncated policy_config.json"] = bad_json
    cases["empty directory"] = root / "empty"
    cases["empty directory"].mkdir()
    cases["missing path"] = root / "nowhere"
    return cases


def test_missing_or_partial_checkpoints(policy_dir, tmp_path, capsys) -> None:
    face = tmp_path / "face.png"
    Image.fromarray(_noise(20, 20)).save(face)
    for case, ckpt in _partial_checkpoints(tmp_path / "ckpts", policy_dir).items():
        code, err = run_cli(
            [
                "restore",
                "--ckpt",
                str(ckpt),
                "--out",
                str(tmp_path / "out" / ckpt.name),
                "--quiet",
                str(face),
            ],
            capsys,
        )
        entry = record(
            "checkpoint", f"restore --ckpt: {case}", classify(code, err), error_message(err) or err
        )
        assert entry.outcome == "clear error" and str(ckpt) in err, (case, err)


@pytest.mark.parametrize("damage", ["truncated", "not Parquet", "no shards"])
def test_training_on_damaged_shards(tmp_path, capsys, damage) -> None:
    shards = tmp_path / "shards"
    code, err = run_cli(["data", "build", "--src", str(embedded_faces_dir()), "--out", str(shards), "--size", "32", "--quiet"], capsys)
    assert code == 0, err
    shard = min(shards.glob("shard-*.parquet"))
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    elif damage == "not Parquet":
        shard.write_text("id,image\n1,abc\n")
    else:
        shard.unlink()
    code, err = run_cli(
        ["train", "stage1.1", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", f"data.shards={shards}",
         "stage1_1.steps=1", "logging.progress=false"],
        capsys,
    )  # fmt: skip
    entry = record("training", f"stage1.1 on shards: {damage}", classify(code, err), error_message(err) or err)
    assert entry.outcome == "clear error" and str(shards) in err, err


def test_training_without_a_stage1_checkpoint(tmp_path, capsys) -> None:
    code, err = run_cli(["train", "stage2", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}"], capsys)
    entry = record("training", "stage2 before Stage 1", classify(code, err), error_message(err) or err)
    assert entry.outcome == "clear error" and "stage1" in err, err


def test_full_size_config_without_reward_weights_fails_before_ray(tmp_path, capsys) -> None:
    code, err = run_cli(["train", "stage2", "configs/prefrestore.yaml", f"run_dir={tmp_path}"], capsys)
    entry = record("training", "full-size rewards, no weight files", classify(code, err), error_message(err) or err)
    assert entry.outcome == "clear error", err
    message = error_message(err)
    for expected in ("'hpsv2'", "HPS_v2.1_compressed.pt", "'clipscore'", "openai/clip-vit-large-patch14", "'pickscore'"):
        assert expected in message, (expected, message)
    assert "Started a local Ray instance" not in err  # failed before any actor or cluster started


def test_an_interrupted_checkpoint_write_is_ignored(policy_dir, tmp_path) -> None:
    """A kill mid-write leaves a hidden temporary directory: resuming uses the previous checkpoint."""
    root = tmp_path / "run" / "checkpoints" / "stage2"
    good = root / "step_000004"
    shutil.copytree(policy_dir, good / "policy")
    torch.save({"step": 4}, good / "trainer_state.pt")
    shutil.copytree(policy_dir, root / ".tmp-step_000006-1234" / "policy")  # no trainer state yet
    found = list_checkpoints(tmp_path / "run", "stage2")
    entry = record(
        "checkpoint",
        "half-written checkpoint (kill mid-save)",
        "handled" if found == [(4, good)] else "CRASH",
        f"resumes from {found[-1][1].name if found else 'nothing'}",
    )
    assert entry.outcome == "handled"


def test_nan_and_inf_rewards_never_reach_training() -> None:
    aggregator = RewardAggregator([RewardSpec(name="sharpness"), RewardSpec(name="psnr", weight=0.5)])
    sharp = torch.tensor([1.0, 2.0, math.nan, 4.0, 5.0, 6.0, math.inf, 8.0])
    psnr = torch.tensor([20.0, 21.0, 22.0, 23.0, -math.inf, 25.0, 26.0, 27.0])
    result = aggregator.combine({"sharpness": sharp, "psnr": psnr}, groups=2, candidates=4)
    masked = (~result.valid).flatten().tolist()
    ok = masked == [False, False, True, False, True, False, True, False] and bool(
        torch.isfinite(result.r).all()
    )
    entry = record(
        "rewards",
        "NaN / +inf / -inf reward scores",
        "handled" if ok else "CRASH",
        f"masked {sum(masked)} samples, counted in reward/nonfinite/*",
    )
    assert entry.outcome == "handled", result
    assert result.metrics["reward/nonfinite/sharpness"] == 2 and result.metrics["reward/nonfinite/psnr"] == 1


def test_a_reward_that_raises_scores_nan_and_is_recorded() -> None:
    worker = RewardWorker([RewardSpec(name="tests.test_bad_inputs:Exploding"), RewardSpec(name="sharpness")])
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    scores = worker.score(images, RewardBatch([""] * 4))
    errors = worker.take_errors()
    ok = (
        bool(scores["Exploding"].isnan().all()) and bool(torch.isfinite(scores["sharpness"]).all()) and errors
    )
    entry = record(
        "rewards",
        "exception inside a reward",
        "handled" if ok else "CRASH",
        errors[0].error if errors else "no error recorded",
    )
    assert entry.outcome in ACCEPTED
