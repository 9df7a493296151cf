"""The config schema: defaults, YAML + overrides, and error messages a user can act on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from rlrestore.config import (
    POLICY_SECTIONS,
    RENAMED_KEYS,
    ActorGroupConfig,
    ConfigError,
    RunConfig,
    Stage2Config,
    describe_schema,
    load_config,
    parse_override,
    save_config,
)
from rlrestore.policies.prefrestore import PrefRestorePolicy
from tests.conftest import TINY_CONFIG, tiny_config


def _config_error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def _leaf_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if model is RunConfig and name == "policy":  # one section per policy type
            for section in POLICY_SECTIONS.values():
                keys.extend(key for key in _leaf_keys(section, "policy.") if key not in keys)
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_leaf_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


# ----------------------------------------------------------------------------- valid configs
def test_defaults_validate_to_the_paper_recipe() -> None:
    config = load_config()
    assert isinstance(config, RunConfig)
    assert config.policy.resolution == 512
    assert config.policy.codebook_size == 65536
    assert config.policy.flow_shift == 3.0
    assert config.policy.connector_norm_init == pytest.approx(5.5**0.5)
    assert config.stage1_1.optim.lr == 1e-5
    assert config.stage1_1.trainable == ["integrator", "diffusion_connector", "vae_connector"]
    assert config.stage1_2.trainable == ["transformer", "lq_encoder", "vae_connector"]
    assert config.degradation.blur_sigma == (1.0, 15.0)
    assert config.autoencoder.steps == 0
    assert config.stage("stage1.2") is config.stage1_2


def test_yaml_plus_overrides_with_nested_keys_and_yaml_values(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path,
        "stage1_1.steps=7",
        "stage1_1.optim.lr=2.5e-4",
        "stage1_1.optim.betas=[0.8, 0.99]",
        "degradation.blur_sigma=[0.5, 2]",
        "stage1_2.trainable=[transformer]",
        "policy.transformer.arch.num_layers=1",
        "ray.address=null",
        "policy.prompt=<image> a=b",
        "stage1_2.optim.lr=1e-3",
    )
    assert config.run_dir == str(tmp_path)
    assert config.stage1_1.steps == 7
    assert config.stage1_1.optim.lr == 2.5e-4 and isinstance(config.stage1_1.optim.lr, float)
    assert config.stage1_1.optim.betas == (0.8, 0.99)
    assert config.degradation.blur_sigma == (0.5, 2.0)
    assert config.stage1_2.trainable == ["transformer"]
    assert config.policy.transformer.arch["num_layers"] == 1
    assert config.ray.address is None
    assert config.policy.prompt == "<image> a=b"  # only the first '=' splits
    # YAML 1.1 reads '1e-3' as a string; the float field still takes it.
    assert config.stage1_2.optim.lr == 1e-3 and isinstance(config.stage1_2.optim.lr, float)
    # Untouched YAML values survive next to the overridden ones.
    assert config.stage1_1.batch_size == 8
    assert config.policy.transformer.arch["caption_channels"] == 64
    assert config.stage1_1.optim.warmup_ratio == 0.01


def test_parse_override_yaml_types() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=2.5e-3") == (["a"], 2.5e-3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a={x: 1}") == (["a"], {"x": 1})
    assert parse_override("a=") == (["a"], "")


# ----------------------------------------------------------------------------- errors
def test_unknown_top_level_key() -> None:
    message = _config_error(["bogus=1"])
    assert "bogus: unknown key" in message
    assert "1" in message
    assert "allowed keys:" in message and "stage1_1" in message and "policy" in message


def test_unknown_nested_key_lists_the_allowed_keys() -> None:
    message = _config_error(["stage1_1.bogsu=3"])
    assert "stage1_1.bogsu: unknown key (value 3)" in message
    allowed = message.split("allowed keys:")[1]
    for key in ("batch_size", "ce_weight", "diff_weight", "optim", "steps", "trainable"):
        assert key in allowed


def test_unknown_deeply_nested_key() -> None:
    message = _config_error(["stage1_1.optim.learning_rate=0.1"])
    assert "stage1_1.optim.learning_rate: unknown key" in message
    assert "lr" in message.split("allowed keys:")[1]


def test_wrong_type() -> None:
    message = _config_error(["stage1_1.steps=abc"])
    assert "stage1_1.steps = 'abc'" in message
    assert "valid integer" in message


def test_out_of_range() -> None:
    message = _config_error(["stage1_1.optim.lr=-1"])
    assert "stage1_1.optim.lr = -1" in message
    assert "greater than 0" in message


def test_bad_literal_lists_the_choices() -> None:
    message = _config_error(["sampler.ar_sampling=beam"])
    assert "sampler.ar_sampling = 'beam'" in message
    assert "'greedy'" in message and "'sample'" in message


def test_reversed_range() -> None:
    message = _config_error(["degradation.blur_sigma=[5,1]"])
    assert "degradation.blur_sigma" in message
    assert "[5, 1]" in message
    assert "above high" in message


def test_batch_not_divisible_by_workers() -> None:
    message = _config_error(["ray.train_workers.num_actors=3", "autoencoder.batch_size=6", "stage1_2.batch_size=6"])
    assert "stage1_1.batch_size=128" in message
    assert "ray.train_workers.num_actors=3" in message
    assert "divisible" in message


def test_caption_prompt_without_placeholder() -> None:
    message = _config_error(["policy.caption_prompt=<image> restore"])
    assert "policy.caption_prompt = '<image> restore'" in message
    assert "{caption}" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("foo", "not of the form key=value"),
        ("=3", "empty key"),
        ("a..b=1", "empty key"),
        (" =1", "empty key"),
    ],
)
def test_malformed_override(override: str, expected: str) -> None:
    message = _config_error([override])
    assert expected in message
    assert repr(override) in message


def test_override_into_a_value_is_rejected() -> None:
    message = _config_error(["stage1_1.steps.x=3"], TINY_CONFIG)
    assert "'steps' holds a value, not a section" in message


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = _config_error([], missing)
    assert str(missing) in message and "does not exist" in message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    message = _config_error([], path)
    assert str(path) in message and "mapping" in message and "list" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("policy: [unclosed\n")
    assert "not valid YAML" in _config_error([], path)


def test_empty_yaml_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == load_config()


def test_errors_from_the_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sampler:\n  steps: 0\n")
    message = _config_error([], path)
    assert str(path) in message
    assert "sampler.steps = 0" in message and "greater than or equal to 1" in message


def test_all_errors_are_reported_at_once() -> None:
    message = _config_error(["stage1_1.steps=abc", "sampler.ar_sampling=beam"])
    assert "stage1_1.steps" in message and "sampler.ar_sampling" in message


# ----------------------------------------------------------------------------- schema docs, save
def test_describe_schema_lists_every_leaf_key_with_a_description() -> None:
    lines = describe_schema()
    described = {line.split(" ", 1)[0].rstrip(":"): line for line in lines}
    leaves = _leaf_keys()
    assert len(leaves) > 60
    for key in leaves:
        assert key in described, f"{key} missing from describe_schema()"
        line = described[key]
        assert "(default " in line
        description = line.rsplit("): ", 1)[1]
        assert description and description != "None", f"{key} has no description"
    assert "stage1_1.optim.lr (default 1e-05): Peak learning rate." in lines


def test_save_config_round_trips(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "stage1_1.steps=3", "degradation.noise=[0, 5]", "policy.prompt=<image>")
    path = tmp_path / "resolved.yaml"
    save_config(config, path)
    again = load_config(path)
    assert again == config
    assert again.policy.vae.arch == config.policy.vae.arch


@pytest.mark.parametrize("component", ["transformer", "vae", "integrator", "vision"])
def test_unknown_arch_key_is_rejected_when_building_the_policy(tmp_path: Path, component: str) -> None:
    config = tiny_config(tmp_path, f"policy.{component}.arch.bogus=1")  # the schema accepts any arch dict
    with pytest.raises(ValueError) as info:
        PrefRestorePolicy.from_config(config.policy)
    message = str(info.value)
    assert f"policy.{component}.arch" in message
    assert "bogus" in message
    assert "allowed keys" in message


def test_async_rollouts_need_a_policy_lag_of_at_least_one() -> None:
    with pytest.raises(ConfigError, match=r"max_policy_lag=0: set max_policy_lag >= 1 or asynchronous=false"):
        load_config(None, ["stage2.rollout.asynchronous=true", "stage2.rollout.max_policy_lag=0"])
    assert load_config(None, ["stage2.rollout.max_policy_lag=0"]).stage2.rollout.max_policy_lag == 0  # synchronous: lag 0


def test_stale_rollouts_are_the_ones_lagging_more_than_allowed() -> None:
    from types import SimpleNamespace

    from rlrestore.orchestration.stage2_step import stale_parts

    parts = [SimpleNamespace(policy_version=version) for version in (5, 4, 3)]
    assert stale_parts(parts, step=5, max_lag=1) == [2]
    assert stale_parts(parts, step=5, max_lag=2) == []
    assert stale_parts(parts, step=5, max_lag=0) == [1, 2]


def test_deprecated_policy_dtype_means_mixed_precision() -> None:
    with pytest.warns(FutureWarning, match="policy.dtype=bfloat16 is deprecated"):
        config = load_config(None, ["policy.dtype=bfloat16"])
    assert config.precision == "bf16-mixed"
    assert load_config(None, ["policy.dtype=float32"]).precision == "fp32"


# ----------------------------------------------------------------------------- renamed keys
# A value for every key of the previous release, unlike the default of its new place.
GROUP = {"num_actors": 3, "num_cpus": 0.25, "num_gpus": 0.0}
OLD_VALUES = {
    "stage2.rollout_batch": 3,
    "stage2.sampler_steps": 5,
    "stage2.sampler_method": "dpm2",
    "stage2.async_rollouts": True,
    "stage2.max_policy_lag": 2,
    "stage2.micro_batch": 3,
    "stage2.finetune": "lora",
    "stage2.lora_rank": 4,
    "stage2.lora_alpha": 8.0,
    "stage2.lora_init": "gaussian",
    "stage2.lora_targets": ["to_q"],
    "stage2.zero_stage": 1,
    "stage2.rollout_workers": GROUP,
    "stage2.reward_workers": GROUP,
    "stage2.reward_actors": {"gpu": GROUP},
    "stage2.learners": GROUP,
    "stage2.placement_strategy": "SPREAD",
    "stage2.placement_timeout_s": 7.0,
    "stage2.max_actor_failures": 4,
    "stage2.reward_errors": {"policy": "fail", "retries": 0, "timeout_s": 9.0},
    "stage2.checkpoint_every": 7,
    "stage2.keep_checkpoints": 5,
    "stage2.sample_grid_every": 6,
    "ray.num_workers": 4,
    "ray.cpus_per_worker": 0.25,
    "ray.gpus_per_worker": 1.0,
    "eval.num_actors": 3,
    "eval.num_cpus": 2.0,
    "eval.num_gpus": 0.5,
}


def _at(config: RunConfig, key: str) -> Any:
    node: Any = config.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


def _nested(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def test_every_renamed_key_has_a_test_value() -> None:
    assert OLD_VALUES.keys() == RENAMED_KEYS.keys()


@pytest.mark.parametrize(("old", "new"), RENAMED_KEYS.items())
def test_an_old_key_sets_its_new_place_with_a_warning(old: str, new: str, tmp_path: Path) -> None:
    value = OLD_VALUES[old]
    warning = rf"config key {re.escape(old)} is deprecated .* next release: use {re.escape(new)}"
    with pytest.warns(FutureWarning, match=warning):
        from_override = load_config(None, [f"{old}={json.dumps(value)}"])
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(_nested(old, value)))
    with pytest.warns(FutureWarning, match=warning):
        from_file = load_config(path)
    for config in (from_override, from_file):
        assert _at(config, new) == value and _at(config, new) != _at(RunConfig(), new)


@pytest.mark.parametrize(("old", "new"), RENAMED_KEYS.items())
def test_an_old_key_and_its_new_key_both_set_is_an_error(old: str, new: str, tmp_path: Path) -> None:
    value = json.dumps(OLD_VALUES[old])
    with pytest.warns(FutureWarning):
        message = _config_error([f"{old}={value}", f"{new}={value}"])
    assert f"{old} is the old name of {new}; keep only {new}" in message
    path = tmp_path / "both.yaml"
    both = _nested(old, OLD_VALUES[old])
    section, _, rest = new.partition(".")
    both[section].update(_nested(rest, OLD_VALUES[old]))
    path.write_text(yaml.safe_dump(both))
    message = _config_error([], path)
    assert str(path) in message and f"{old} and {new} are both set" in message


def test_an_override_by_either_name_wins_over_the_file(tmp_path: Path) -> None:
    old_file = tmp_path / "old.yaml"
    old_file.write_text("stage2: {rollout_batch: 3, learners: {num_actors: 1}}\nray: {num_workers: 1}\n")
    with pytest.warns(FutureWarning):
        config = load_config(old_file, ["stage2.rollout.batch_size=5", "stage2.resources.learner.num_cpus=2"])
    assert config.stage2.rollout.batch_size == 5
    assert (config.stage2.resources.learner.num_actors, config.stage2.resources.learner.num_cpus) == (1, 2.0)
    with pytest.warns(FutureWarning):
        config = load_config(TINY_CONFIG, ["stage2.rollout_batch=1", "stage2.learners.num_cpus=0.5"])
    assert config.stage2.rollout.batch_size == 1 and config.stage2.resources.learner.num_cpus == 0.5


def test_config_classes_read_old_keys_too() -> None:
    with pytest.warns(FutureWarning, match="stage2.reward_actors"):
        stage = Stage2Config(reward_actors={"gpu": GROUP}, rewards=[{"name": "sharpness", "actor": "gpu"}])
    assert stage.resources.reward_groups["gpu"].num_actors == 3
    with pytest.raises(ValidationError, match="stage2.micro_batch and stage2.learner.micro_batch are both set"):
        Stage2Config(micro_batch=2, learner={"micro_batch": 4})


def test_the_schema_lists_the_new_keys_only() -> None:
    keys = {line.split(" ", 1)[0].rstrip(":") for line in describe_schema()}
    assert set(RENAMED_KEYS.values()) <= keys
    assert not set(RENAMED_KEYS) & keys


def test_every_role_sizes_its_actors_with_one_vocabulary() -> None:
    config = load_config(TINY_CONFIG)
    groups = [
        config.ray.train_workers, config.eval.actors, config.stage2.resources.rollout,
        config.stage2.resources.reward, config.stage2.resources.learner,
    ]  # fmt: skip
    assert all(isinstance(group, ActorGroupConfig) for group in groups)
    assert config.eval.actors.num_actors == 0  # eval alone may run in-process
    assert "num_actors" in _config_error(["stage2.resources.learner.num_actors=0"])
    assert config.stage2.resources.rollout.bundle() == {"CPU": 0.25}
    assert ActorGroupConfig(num_gpus=0.5).bundle() == {"CPU": 0.5, "GPU": 0.5}


def test_the_readme_lists_every_renamed_key() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Renamed keys", 1)[1].split("\n#", 1)[0]
    assert all(f"`{old}`" in section for old in RENAMED_KEYS), [old for old in RENAMED_KEYS if f"`{old}`" not in section]
