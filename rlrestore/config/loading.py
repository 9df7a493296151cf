"""Reading a run config: YAML plus ``key=value`` overrides, clear errors, saving and the schema listing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rlrestore.config.base import ConfigError
from rlrestore.config.policy import FlowUNetConfig, PolicyBaseConfig, PolicyConfig
from rlrestore.config.renames import _renamed_path, move_renamed_keys
from rlrestore.config.run import RunConfig


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


POLICY_SECTIONS: dict[str, type[PolicyBaseConfig]] = {"prefrestore": PolicyConfig, "flow_unet": FlowUNetConfig}


def _user_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error location as the user writes the key: without pydantic's union tag after ``policy``."""
    if len(loc) > 1 and loc[0] == "policy" and loc[1] in POLICY_SECTIONS:
        return (loc[0], *loc[2:])
    return loc


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        loc = item["loc"]
        key = ".".join(str(part) for part in _user_loc(loc))
        value = item.get("input")
        if not key or (item["type"] == "value_error" and isinstance(value, dict)):  # the message names the keys
            lines.append(f"  {key + ': ' if key else ''}{item['msg']}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {value!r}); {_allowed_keys_hint(loc)}")
        else:
            lines.append(f"  {key} = {value!r}: {item['msg']}")
    return "\n".join(lines)


def _allowed_keys_hint(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = RunConfig
    parts = list(loc[:-1])
    while parts:
        part = str(parts.pop(0))
        if model is RunConfig and part == "policy":
            model = POLICY_SECTIONS[str(parts.pop(0))] if parts and parts[0] in POLICY_SECTIONS else PolicyConfig
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "check the spelling"
        model = annotation
    return "allowed keys: " + ", ".join(sorted(model.model_fields))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. stage1_1.steps=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict, creating sections as needed. A renamed key
    (:data:`RENAMED_KEYS`) sets its new place; naming a key by both names is an error."""
    renamed: dict[str, str] = {}  # new key -> the override that named it by its old name
    given: dict[str, str] = {}  # keys named by their current name -> the override
    for text in overrides:
        path, value = parse_override(text)
        new_path = _renamed_path(path)
        (renamed if new_path != path else given)[".".join(new_path)] = text
        path = new_path
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} holds a value, not a section")
            node = child
        node[path[-1]] = value
    for key, text in given.items():
        for new_key, old_text in renamed.items():
            if _overlap(key, new_key):
                raise ConfigError(
                    f"overrides {old_text!r} and {text!r} set the same key: {old_text.split('=', 1)[0]} is "
                    f"the old name of {new_key}; keep only {text.split('=', 1)[0]}"
                )
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when None), apply overrides and validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping at the top, got {type(loaded).__name__}"
            )
        data = loaded or {}
    try:  # renamed keys of the file move first, so that overrides (old or new names) win over them
        data = {key: move_renamed_keys(value, key) for key, value in data.items()}
    except ValueError as exc:
        raise ConfigError(f"invalid configuration ({source}): {exc}") from None
    if overrides:
        source += " + overrides"
        data = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def describe_schema(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per config key with its type, default and description (for --help)."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if model is RunConfig and name == "policy":
            lines.append(f"{key}: {field.description}")
            for tag, section in POLICY_SECTIONS.items():
                lines.append(f"{key} (type: {tag}): {section.__doc__.splitlines()[0]}")
                lines.extend(describe_schema(section, prefix=f"{key}."))
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{key}: {field.description}")
            lines.extend(describe_schema(annotation, prefix=f"{key}."))
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{key} (default {default!r}): {field.description}")
    return lines
