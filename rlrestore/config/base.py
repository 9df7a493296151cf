"""The base of every config section: strict sections, the config error and component specs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentSpec(_Section):
    """One network of the policy: where its weights come from and its architecture."""

    pretrained: str | None = Field(
        None,
        description="Local directory or Hugging Face model id (read from the local HF cache only, "
        "never downloaded) holding this component's weights. None builds it from `arch` with "
        "random initialisation.",
    )
    subfolder: str | None = Field(None, description="Subfolder of `pretrained` holding the component.")
    arch: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the component's config class (diffusers/transformers); "
        "used when `pretrained` is None and to build the model on the meta device.",
    )
