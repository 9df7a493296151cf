"""Reward plugins: the example package installed with pip and resolved by its entry-point name,
clear errors for broken entry points, and the README's "Write your own reward" example run as is."""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import rewards.base
from rewards import RewardBatch, RewardError, build_reward, plugin_rewards, reward_class, reward_name
from rlrestore.config import RewardSpec, load_config

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = ROOT / "examples" / "reward_plugin"
TEST_MODULES = ("rlrestore_colourfulness", "my_rewards")  # the plugin's and the README example's


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed (offline, no dependencies) into a folder of its own."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN_SOURCE, root / "src")  # builds write into the source tree
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True,
    )  # fmt: skip
    return target


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget what a test registered (plugins on first use) and the reward modules it imported."""
    monkeypatch.setattr(rewards.base, "_REGISTRY", dict(rewards.base._REGISTRY))
    yield
    for name in TEST_MODULES:
        sys.modules.pop(name, None)


def _dist(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[rlrestore.rewards]\n{entry_points}\n")


def test_an_installed_plugin_is_found_by_its_entry_point_name(
    installed_plugin: Path, isolated_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "colourfulness" not in plugin_rewards()
    monkeypatch.syspath_prepend(str(installed_plugin))  # also invalidates the import caches
    assert "colourfulness" in plugin_rewards()

    spec = RewardSpec(name="colourfulness")
    module = sys.modules[reward_class("colourfulness").__module__]
    assert Path(module.__file__) == installed_plugin / "rlrestore_colourfulness.py"
    assert reward_name(spec) == "colourfulness" and "colourfulness" in rewards.base.registered_rewards()

    grey = torch.zeros(1, 3, 16, 16)
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 16, 16)
    scores = build_reward(spec)(torch.cat([grey, red]), RewardBatch(["", ""]))
    # Pure red, 8-bit: rg = 255, yb = 127.5, no spread -> M = 0.3 * sqrt(255^2 + 127.5^2).
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.3 * (255.0**2 + 127.5**2) ** 0.5]))
    prior = build_reward(RewardSpec(name="colourfulness", args={"target": 42.0}))(grey, RewardBatch([""]))
    torch.testing.assert_close(prior, torch.tensor([-42.0]))


def test_broken_entry_points_fail_clearly(
    tmp_path: Path, isolated_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry_points = [
        "broken = no_such_module_xyz:Reward",
        "not_a_reward = json:dumps",
        "sharpness = json:dumps",
    ]
    _dist(tmp_path, "fake-plugins", "\n".join([*entry_points, "twice = json:dumps"]))
    _dist(tmp_path, "other-plugins", "twice = json:loads")
    monkeypatch.syspath_prepend(str(tmp_path))

    listed = r"installed plugins \(entry points 'rlrestore.rewards'\): broken, not_a_reward, sharpness, twice"
    with pytest.raises(
        RewardError, match=rf"unknown reward 'nope'; registered rewards: .*sharpness.*; {listed}"
    ):
        reward_class("nope")
    broken = (
        r"plugin reward 'broken' \(entry point 'no_such_module_xyz:Reward' of distribution 'fake-plugins'\)"
    )
    with pytest.raises(RewardError, match=rf"{broken} failed to load: ModuleNotFoundError: No module named"):
        reward_class("broken")
    with pytest.raises(RewardError, match=r"plugin reward 'not_a_reward' .* is not a concrete subclass of"):
        reward_class("not_a_reward")
    twice = r"fake-plugins \(json:dumps\), other-plugins \(json:loads\); uninstall all but one"
    with pytest.raises(RewardError, match=rf"'twice' is declared by several installed plugins: {twice}"):
        reward_class("twice")
    assert reward_class("sharpness").__module__ == "rewards.quality"  # built-ins come first


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Write your own reward")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_readme_example_runs(
    isolated_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = _readme_section()
    module, usage = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    config = next(
        block for block in re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL) if "stage2:" in block
    )
    (tmp_path / "my_rewards.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "try_it.py").write_text(usage)
    runpy.run_path(str(tmp_path / "try_it.py"), run_name="__main__")

    (tmp_path / "config.yaml").write_text(config)
    stage = load_config(tmp_path / "config.yaml").stage2
    [spec] = [spec for spec in stage.rewards if spec.name == "my_rewards:SkinSaturation"]
    assert spec.actor in stage.resources.reward_groups and reward_name(spec) == "skin_saturation"
    scores = build_reward(spec)(torch.rand(2, 3, 16, 16) * 2 - 1, RewardBatch(["", ""]))
    assert scores.shape == (2,) and (scores <= 0).all()
