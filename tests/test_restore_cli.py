"""The ``rlrestore`` command line, run in-process through ``main``: restore, data build, config,
plot and every subcommand's ``--help``; plus the installed console script."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rlrestore.orchestration.cli import main
from rlrestore.orchestration.cli_tools import default_config_path
from rlrestore.tracking import MetricsWriter
from tests.conftest import build_tiny_policy

STEPS = ["--steps", "2", "--quiet"]
# 16 px SigLIP input -> 16 semantic tokens instead of 64: the AR loop dominates restore time on CPU.
FEW_TOKENS = ("policy.tokenizer_resolution=16", "policy.vision.arch.image_size=16")


def _gradient(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx * 7 + yy * 3) % 256], axis=2
    ).astype(np.uint8)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_unreadable(folder: Path) -> dict[str, str]:
    """A truncated PNG, an empty file and a text file named .png; returns name -> expected reason."""
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    png = _png_bytes(Image.fromarray(noise))
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image\n")
    return {
        "truncated.png": "corrupt or truncated image",
        "empty.png": "empty file (0 bytes)",
        "notes.png": "not a recognised image format",
    }


def _write_zoo(folder: Path) -> dict[str, tuple[int, int]]:
    """Readable images of many modes and sizes; returns file name -> (width, height)."""
    folder.mkdir(parents=True)
    Image.fromarray(_gradient(50, 37)).save(folder / "rgb.png")
    Image.fromarray(_gradient(40, 30)[:, :, 0]).save(folder / "gray.jpg", quality=90)
    rgba = np.dstack([_gradient(30, 45), np.full((45, 30), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "alpha.png")
    deep = (np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 131).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    Image.fromarray(_gradient(33, 21)).save(folder / "photo.webp")
    Image.fromarray(_gradient(8, 8)).save(folder / "tiny.png")
    Image.fromarray(_gradient(700, 500)).save(folder / "large.jpg", quality=85)
    return {
        "rgb.png": (50, 37),
        "gray.jpg": (40, 30),
        "alpha.png": (30, 45),
        "deep.png": (20, 24),
        "photo.webp": (33, 21),
        "tiny.png": (8, 8),
        "large.jpg": (700, 500),
    }


def _outputs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny policy, reachable as a policy dir, a checkpoint dir and a run dir."""
    root = tmp_path_factory.mktemp("ckpt")
    policy_dir = root / "policy"
    build_tiny_policy(0, *FEW_TOKENS).save_pretrained(policy_dir)
    run_dir = root / "run"
    step_dir = run_dir / "checkpoints" / "stage1.2" / "step_000010"
    shutil.copytree(policy_dir, step_dir / "policy")
    torch.save({"step": 10}, step_dir / "trainer_state.pt")
    return {"policy": policy_dir, "checkpoint": step_dir, "run": run_dir}


@pytest.fixture
def face(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "face.png"
    path.parent.mkdir()
    Image.fromarray(_gradient(24, 18)).save(path)
    return path


# ------------------------------------------------------------------------------------- restore
def test_restore_folder_of_mixed_inputs(tmp_path, checkpoints, capsys):
    sizes = _write_zoo(tmp_path / "faces")
    reasons = _write_unreadable(tmp_path / "faces")
    direct = tmp_path / "direct.jpg"
    Image.fromarray(_gradient(31, 47)).save(direct)
    sizes[direct.name] = (31, 47)
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"

    code = main(
        [
            "restore",
            "--ckpt",
            str(checkpoints["policy"]),
            "--out",
            str(out),
            *STEPS,
            str(tmp_path / "faces"),
            str(direct),
            str(missing),
        ]
    )

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    assert f"restored {len(sizes)} image(s), skipped {len(reasons) + 1}" in captured.out
    assert f"outputs: {out.resolve()}" in captured.out
    written = {path.name for path in out.glob("*.png")}
    assert written == {f"{Path(name).stem}.png" for name in sizes}
    for name, size in sizes.items():
        with Image.open(out / f"{Path(name).stem}.png") as restored:
            assert (restored.size, restored.mode) == (size, "RGB"), name

    report = json.loads((out / "restore_report.json").read_text())
    assert report["checkpoint"] == str(checkpoints["policy"])
    skipped = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {*reasons, missing.name}
    assert skipped[missing.name] == "no such file or directory"
    for name, reason in reasons.items():
        assert skipped[name].startswith(reason), (name, skipped[name])
        assert f"skipped {tmp_path / 'faces' / name}: " in captured.out
    assert f"skipped {missing}: no such file or directory" in captured.out
    assert {Path(item["input"]).name: item["size"] for item in report["outputs"]} == {
        name: list(size) for name, size in sizes.items()
    }
    # Seeds count readable inputs only, in input order, however the unreadable ones fall in batches.
    assert [item["candidates"][0]["seed"] for item in report["outputs"]] == list(range(len(sizes)))


def test_restore_samples_seeds_and_determinism(tmp_path, checkpoints, face, capsys):
    args = [
        "restore",
        "--ckpt",
        str(checkpoints["policy"]),
        *STEPS,
        "--samples",
        "3",
        "--seed",
        "7",
        str(face),
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()

    first, second = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    assert set(first) == {"face.png", "face_sample1.png", "face_sample2.png"}
    assert first == second
    assert len(set(first.values())) == 3, "candidates with different seeds should differ"
    report = json.loads((tmp_path / "a" / "restore_report.json").read_text())
    assert report["outputs"][0]["candidates"] == [
        {"file": "face.png", "seed": 7},
        {"file": "face_sample1.png", "seed": 8},
        {"file": "face_sample2.png", "seed": 9},
    ]
    for name in first:
        with Image.open(tmp_path / "a" / name) as image:
            assert (image.size, image.mode) == ((24, 18), "RGB")


def test_restore_accepts_policy_checkpoint_and_run_dirs(tmp_path, checkpoints, face, capsys):
    results = {}
    for kind, ckpt in checkpoints.items():
        out = tmp_path / kind
        assert main(["restore", "--ckpt", str(ckpt), "--out", str(out), *STEPS, str(face)]) == 0, kind
        report = json.loads((out / "restore_report.json").read_text())
        expected = checkpoints["policy"] if kind == "policy" else checkpoints["checkpoint"] / "policy"
        assert report["checkpoint"] == str(expected)
        results[kind] = _outputs(out)
    capsys.readouterr()
    assert results["checkpoint"] == results["policy"] == results["run"]


@pytest.mark.parametrize("problem", ["missing", "empty_dir", "bad_config"])
def test_restore_bad_ckpt_exits_2_naming_the_path(tmp_path, face, capsys, problem):
    ckpt = tmp_path / "ckpt"
    if problem != "missing":
        ckpt.mkdir()
    if problem == "bad_config":
        (ckpt / "policy_config.json").write_text("{not json")

    code = main(["restore", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), *STEPS, str(face)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rlrestore: error: ") and str(ckpt) in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "named"), [(["--steps", "0"], "sampler.steps"), (["--samples", "0"], "samples must be >= 1")]
)
def test_restore_bad_sampler_args_exit_2(tmp_path, checkpoints, face, capsys, args, named):
    out = tmp_path / "out"
    code = main(
        ["restore", "--ckpt", str(checkpoints["policy"]), "--out", str(out), "--quiet", *args, str(face)]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rlrestore: error: ") and named in err
    assert not list(out.glob("*.png"))


def test_restore_exits_1_when_nothing_is_readable(tmp_path, checkpoints, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    reasons = _write_unreadable(folder)
    out = tmp_path / "out"

    code = main(["restore", "--ckpt", str(checkpoints["policy"]), "--out", str(out), *STEPS, str(folder)])

    captured = capsys.readouterr()
    assert code == 1
    assert "restored 0 image(s)" in captured.out
    report = json.loads((out / "restore_report.json").read_text())
    assert report["outputs"] == []
    assert sorted(Path(item["path"]).name for item in report["skipped"]) == sorted(reasons)
    assert not list(out.glob("*.png"))


# ---------------------------------------------------------------------------------- data build
def test_data_build_skips_and_reports_bad_files(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "shards"
    src.mkdir()
    Image.fromarray(_gradient(40, 30)).save(src / "good.png")
    Image.fromarray(_gradient(20, 20)).save(src / "also_good.jpg")
    reasons = _write_unreadable(src)

    code = main(["data", "build", "--src", str(src), "--out", str(out), "--size", "32", "--quiet"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "stored 2 faces (32 px" in captured.out
    assert f"skipped {len(reasons)} file(s)" in captured.out
    assert f"shards: {out.resolve()}" in captured.out
    report = json.loads((out / "_report.json").read_text())
    assert sorted(item["path"] for item in report["skipped"]) == sorted(reasons)
    assert json.loads((out / "_manifest.json").read_text())["count"] == 2


@pytest.mark.parametrize("contents", ["unreadable", "no_images", "missing"])
def test_data_build_without_readable_images_exits_2(tmp_path, capsys, contents):
    src = tmp_path / "src"
    if contents != "missing":
        src.mkdir()
        (src / "readme.txt").write_text("no faces here")
    if contents == "unreadable":
        _write_unreadable(src)

    code = main(
        ["data", "build", "--src", str(src), "--out", str(tmp_path / "out"), "--size", "32", "--quiet"]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rlrestore: error: ") and str(src) in err
    assert ("does not exist" if contents == "missing" else "no readable image") in err
    assert "Traceback" not in err


# -------------------------------------------------------------------------------------- config
def test_config_keys_lists_documented_keys(capsys):
    assert main(["config", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 50
    keys = {line.split(" ", 1)[0].rstrip(":") for line in lines}
    assert {"stage1_1.optim.lr", "ray.train_workers.num_actors", "sampler.steps"} <= keys
    assert all(": " in line for line in lines), "every key carries a description"


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", str(default_config_path()), "stage1_1.steps=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage1_1"]["steps"] == 3
    assert shown["policy"]["resolution"] == 64


@pytest.mark.parametrize("override", ["stage1_1.stepz=3", "stage1_1.steps=0", "stage1_1.steps"])
def test_config_show_bad_override_exits_2(capsys, override):
    assert main(["config", "show", str(default_config_path()), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlrestore: error: ")
    assert override.split("=")[0] in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    "argv",
    [["--help"], ["data", "build"], ["train"], ["restore"], ["demo"], ["plot"], ["config"]],
    ids=" ".join,
)
def test_help_of_every_subcommand(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"] if argv != ["--help"] else argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlrestore")
    assert " ".join(argv).replace("--help", "").strip() in out.splitlines()[0]


def test_installed_console_script_help():
    script = Path(sys.executable).parent / "rlrestore"
    assert script.is_file(), f"console script missing next to {sys.executable}"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: rlrestore")
    for command in ("data", "train", "restore", "demo", "plot", "config"):
        assert command in result.stdout


# ---------------------------------------------------------------------------------------- plot
def test_plot_without_metrics_exits_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlrestore: error: no metrics to plot") and str(tmp_path) in err
    assert "Traceback" not in err


def test_plot_draws_each_stage(tmp_path, capsys):
    for stage in ("stage1.1", "stage1.2"):
        with MetricsWriter(tmp_path, stage) as writer:
            for step in range(12):
                writer.log({"loss": 1.0 / (step + 1), "lr": 1e-3}, step=step)

    assert main(["plot", str(tmp_path)]) == 0

    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [tmp_path / "plots" / "stage1.1.png", tmp_path / "plots" / "stage1.2.png"]
    for path in printed:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 100


def test_restore_refuses_an_output_folder_inside_the_inputs(tmp_path, checkpoints, face, capsys) -> None:
    inputs = tmp_path / "faces"
    inputs.mkdir()
    (inputs / "a.png").write_bytes(face.read_bytes())
    code = main(["restore", str(inputs), "--ckpt", str(checkpoints["policy"]), "--out", str(inputs), "--steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "contains input" in err and "Traceback" not in err
    assert (inputs / "a.png").read_bytes() == face.read_bytes()
