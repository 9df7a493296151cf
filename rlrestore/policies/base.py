"""The policy interface every restoration model implements, and that nothing above it looks behind.

Stage 1, Stage 2 (rollout workers and NFT learners), ``restore`` and ``eval`` use a policy only
through these types:

* :class:`Condition`: what a degraded input conditions the model on, one per input and shared by its
  K candidates; computed once (cacheable: the integrator is frozen in Stage 2) and passed by value
  between roles. A dataclass of tensors with a leading input dimension.
* :class:`VelocityModel`: the network Stage 2 trains, v(x_t, t, c) on the flow
  ``x_t = (1 - t) x0 + t eps`` (t = 1 is the path's far end). It says where a path ends
  (:meth:`VelocityModel.endpoint`: pure noise for Pref-Restore, a noised estimate of the clean
  image for posterior-mean flows), where sampling starts (:meth:`VelocityModel.start`, at
  ``t_max``: 1 for full-path models, t* < 1 for truncated one-step models) and which t it trains
  on (``[0, t_max]``). Its ``prepare`` / ``velocity`` split lets samplers compose the condition once
  per sampling while training differentiates through it.
* :class:`RestorationPolicy`: every network of a model. The condition of a degraded batch, the
  clean latent of a clean batch (the flow target x0), decoding latents to images, the latent shape,
  Stage 1 losses per stage, save / load, and the velocity model.

Samplers (``rlrestore.flow``) and the restoration pipeline (``rlrestore.policies.pipeline``) live
apart from the models, as diffusers keeps schedulers and pipelines apart from networks.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import torch
from torch import Tensor, nn

from rlrestore.models.loading import CheckpointError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from rlrestore.config import SamplerConfig

POLICY_CONFIG = "policy_config.json"  # names the policy type and holds its config section
C = TypeVar("C", bound="BaseModel")


def read_policy_config(path: str | Path, config_class: type[C]) -> tuple[dict[str, Any], C]:
    """``policy_config.json`` of a policy directory: the whole file and its ``policy`` section as
    ``config_class``; a missing or invalid file raises :class:`CheckpointError` naming it."""
    meta_file = Path(path) / POLICY_CONFIG
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a policy checkpoint: {POLICY_CONFIG} is missing")
    try:
        meta = json.loads(meta_file.read_text())
        return meta, config_class.model_validate(meta["policy"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_file} is unreadable or invalid: {exc}") from None


@dataclasses.dataclass
class Condition:
    """Base of a policy's condition record: every field a tensor whose first dimension is the input.

    Floating fields follow ``to(dtype=...)``; integer fields (codes) keep their dtype.
    """

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Self:
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        first = dataclasses.fields(self)[0].name
        return getattr(self, first).shape[0]

    def select(self, index: Tensor) -> Self:
        """The conditions of the inputs ``index`` (e.g. each candidate's input)."""
        return self._map(lambda value: value[index])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Self:
        """On ``device``; floating fields in ``dtype`` when given."""
        return self._map(
            lambda value: value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
        )

    def zeros(self) -> Self:
        """An all-zero condition of the same shapes (the unconditional branch, idle passes)."""
        return self._map(torch.zeros_like)

    @classmethod
    def cat(cls, parts: Sequence[Self]) -> Self:
        """One condition from the conditions of several chunks of inputs."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: torch.cat([getattr(part, name) for part in parts]) for name in names})


class VelocityModel(nn.Module, ABC):
    """v(x_t, t, c): the network Stage 2 trains and rollouts sample with.

    Subclasses set ``t_max`` (the largest t sampled and trained on) and ``flow_shift`` (the
    timestep warp of the sampler grid) and implement :meth:`prepare` and :meth:`velocity`.
    """

    t_max: float = 1.0
    flow_shift: float = 1.0

    @abstractmethod
    def prepare(self, condition: Condition) -> Tensor:
        """The network input of ``condition`` ([N, ...] per sample); all zeros is the unconditional one."""

    @abstractmethod
    def velocity(self, x_t: Tensor, t: Tensor, prepared: Tensor) -> Tensor:
        """v(x_t, t) for a prepared condition; t in [0, t_max], one per sample."""

    def forward(self, x_t: Tensor, t: Tensor, condition: Condition) -> Tensor:
        return self.velocity(x_t, t, self.prepare(condition))

    def stage2_modules(self) -> list[nn.Module]:
        """The parts Stage 2 trains (fully, or through LoRA adapters); the rest stays frozen."""
        return [self]

    def endpoint(self, condition: Condition, noise: Tensor) -> Tensor:
        """eps of ``x_t = (1 - t) x0 + t eps``: where the path from x0 ends at t = 1 (the NFT loss
        interpolates towards it). Standard flows end at pure noise."""
        return noise

    def start(self, condition: Condition, noise: Tensor) -> Tensor:
        """Where sampling starts, at ``t_max``: the path's endpoint when ``t_max`` is 1."""
        if self.t_max != 1.0:
            raise TypeError(
                f"{type(self).__name__} samples from t_max={self.t_max} and must define start()"
            )
        return self.endpoint(condition, noise)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


@dataclasses.dataclass
class RestoreOutput:
    """K candidates per input: clean latents x0, decoded images in [-1, 1], their seeds, and the
    condition of each input (shared by its K candidates)."""

    latents: Tensor  # [B, K, C, h, w] float32
    images: Tensor  # [B, K, 3, R, R] float32
    seeds: Tensor  # [B, K]
    condition: Condition


class RestorationPolicy(nn.Module, ABC):
    """All networks of one restoration model and the operations stages and roles compose.

    Subclasses register under ``policy_type`` (``rlrestore.policies.registry``), hold their
    configuration in ``config`` (whose ``type`` names them) and their Stage 2 network in
    ``velocity_model``; ``components`` names what a stage's ``trainable`` list may hold and
    ``stages`` the Stage 1 stages the model trains in.
    """

    policy_type: ClassVar[str]
    components: ClassVar[tuple[str, ...]]
    stages: ClassVar[tuple[str, ...]]
    config: Any
    velocity_model: VelocityModel

    # ----------------------------------------------------------------------------- construction
    @classmethod
    @abstractmethod
    def from_config(cls, config: Any) -> Self:
        """Build every network from the config (random init or local weights), in float32."""

    @abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write a directory with ``policy_config.json`` that :meth:`from_pretrained` reads."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path) -> Self:
        """Load a directory written by :meth:`save_pretrained` (safetensors only), in float32."""

    @classmethod
    @abstractmethod
    def velocity_from_pretrained(cls, path: str | Path) -> VelocityModel:
        """Only the velocity model of a policy directory, in float32 (what a learner rank needs)."""

    @classmethod
    @abstractmethod
    def write_velocity(cls, base: Path, state: dict[str, Tensor], out: Path) -> None:
        """A policy directory equal to ``base`` except for the velocity model's weights ``state``
        (Stage 2 checkpoints), written without building the other networks."""

    def apply_runtime_options(self, options: dict[str, Any]) -> None:
        """Adopt a run's runtime options (``PolicyBaseConfig.runtime_options()``: how the policy runs,
        e.g. Pref-Restore's ``ar_backend``), which policy directories do not keep. Options of another
        policy type are ignored; the keys are validated as the policy's config section."""
        if options.get("type") != self.policy_type:
            return
        keys = type(self.config).runtime_keys
        updated = {**self.config.model_dump(), **{key: options[key] for key in keys if key in options}}
        self.config = type(self.config).model_validate(updated)

    # ----------------------------------------------------------------------------- inference
    @abstractmethod
    def condition(self, lq: Tensor, captions: list[str], sampler: SamplerConfig, generator: torch.Generator) -> Condition:
        """The condition of degraded images ``lq`` ([-1, 1], generation size) at inference."""

    def deterministic_condition(self, sampler: SamplerConfig) -> bool:
        """Whether :meth:`condition` gives the same condition for the same input under ``sampler``
        whatever the generator (and whatever Stage 2 trains: the condition is made outside the
        velocity model). Rollout actors cache such conditions across epochs when the degradation of
        each sample is fixed. Conservative default: False."""
        return False

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Clean images -> the latent the flow generates (its x0), float32."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> float32 images in [-1, 1]."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent at the generation resolution."""

    @property
    def resolution(self) -> int:
        """Side of the square images the policy restores."""
        return int(self.config.resolution)

    @torch.no_grad()
    def restore(
        self,
        lq: Tensor,
        captions: list[str],
        seeds: Tensor,
        sampler: SamplerConfig,
        condition: Condition | None = None,
    ) -> RestoreOutput:
        """K candidate restorations per degraded image (``rlrestore.policies.pipeline``);
        ``condition``: the inputs' conditions if already known."""
        from rlrestore.policies.pipeline import restore_candidates

        return restore_candidates(self, lq, captions, seeds, sampler, condition)

    # ----------------------------------------------------------------------------- Stage 1
    @abstractmethod
    def stage1_losses(self, stage: str, batch: dict, config: Any, generator: torch.Generator) -> dict[str, Tensor]:
        """The losses of one supervised step of ``stage``; ``loss`` is the total to back-propagate."""

    def after_handoff(self, previous_stage: str, clean_images: Tensor) -> None:
        """Adjust a policy handed over from ``previous_stage`` before the next stage trains it."""

    def component(self, name: str) -> nn.Module:
        """A trainable component by its config name."""
        if name not in self.components:
            raise KeyError(
                f"{self.policy_type} policy has no component {name!r}; its components are {list(self.components)}"
            )
        return getattr(self, name)

    def set_trainable(self, names: Sequence[str]) -> list[nn.Parameter]:
        """Freeze everything but the named components; return their parameters."""
        self.requires_grad_(False)
        params: list[nn.Parameter] = []
        for name in names:
            module = self.component(name)
            module.requires_grad_(True)
            params.extend(module.parameters())
        return params

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
