"""Reward plugins: the example package installed with pip and resolved by its entry-point name,
clear errors for broken entry points, and the README's "Write your own reward" example run as is."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rewards.base
from rewards import RewardBatch, RewardError, build_reward, plugin_rewards, reward_class, reward_name
from rlrestore.config import RewardSpec, load_config

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = ROOT / "examples" / "reward_plugin"


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
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards registered by a test (plugins on first use) are forgotten after it."""
    monkeypatch.setattr(rewards.base, "_REGISTRY", dict(rewards.base._REGISTRY))


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
    monkeypatch.delitem(sys.modules, "rlrestore_colourfulness", raising=False)
    assert "colourfulness" in plugin_rewards()

    spec = RewardSpec(name="colourfulness")
    cls = reward_class("colourfulness")
    assert cls.__module__ == "rlrestore_colourfulness" and Path(sys.modules[cls.__module__].__file__).is_relative_to(
        installed_plugin
    )
    assert reward_name(spec) == "colourfulness" and "colourfulness" in rewards.base.registered_rewards()

    grey = torch.zeros(1, 3, 16, 16)
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 16, 16)
    scores = build_reward(spec)(torch.cat([grey, red]), RewardBatch(["", ""]))
    # Pure red, 8-bit: rg = 255, yb = 127.5, no spread -> M = 0.3 * sqrt(255^2 + 127.5^2).
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.3 * (255.0**2 + 127.5**2) ** 0.5]))
    prior = build_reward(RewardSpec(name="colourfulness", args={"target": 42.0}))(grey, RewardBatch([""]))
    torch.testing.assert_close(prior, torch.tensor([-42.0]))
    sys.modules.pop("rlrestore_colourfulness")


def test_broken_entry_points_fail_clearly(
    tmp_path: Path, isolated_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dist(tmp_path, "fake-plugins", "broken = no_such_module_xyz:Reward\nnot_a_reward = json:dumps\n"
          "sharpness = json:dumps\ntwice = json:dumps")  # fmt: skip
    _dist(tmp_path, "other-plugins", "twice = json:loads")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(RewardError, match=r"unknown reward 'nope'; registered rewards: .*sharpness.*; installed "
                       r"plugins \(entry points 'rlrestore.rewards'\): broken, not_a_reward, sharpness, twice"):  # fmt: skip
        reward_class("nope")
    with pytest.raises(
        RewardError,
        match=r"plugin reward 'broken' \(entry point 'no_such_module_xyz:Reward' of distribution 'fake-plugins'\) "
        r"failed to load: ModuleNotFoundError: No module named 'no_such_module_xyz'",
    ):
        reward_class("broken")
    with pytest.raises(RewardError, match=r"plugin reward 'not_a_reward' .* is not a concrete subclass of rewards.Reward"):
        reward_class("not_a_reward")
    with pytest.raises(RewardError, match=r"'twice' is declared by several installed plugins: fake-plugins \(json:dumps\), "
                       r"other-plugins \(json:loads\); uninstall all but one"):  # fmt: skip
        reward_class("twice")
    assert reward_class("sharpness").__module__ == "rewards.quality"  # built-ins come first


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Write your own reward")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_readme_example_runs(isolated_registry: None, tmp_path: Path) -> None:
    section = _readme_section()
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    config = next(block for block in re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL) if "stage2:" in block)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # defines and registers the example reward

    (tmp_path / "config.yaml").write_text(config)
    stage = load_config(tmp_path / "config.yaml").stage2
    spec = next(spec for spec in stage.rewards if spec.name == "skin_saturation")
    assert spec.actor in stage.reward_actors
    reward = build_reward(spec)
    scores = reward(torch.rand(2, 3, 16, 16) * 2 - 1, RewardBatch(["", ""]))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
