"""The reward interface of Stage 2: what a reward model receives, returns and declares.

A reward scores a batch of restored faces; the reward actors (``rewards.worker``) host one or
more of them and the aggregator (``rewards.aggregate``) turns their scores into the training
signal r of Eq. 12. Every reward, built-in or plugin, is a subclass of :class:`Reward`::

    @register_reward("brightness")
    class Brightness(Reward):
        resources = {"num_cpus": 0.25, "num_gpus": 0.0}

        def __init__(self, device="cpu", offset: float = 0.0):
            super().__init__(device)
            self.offset = offset

        def score(self, images, batch):
            return images.mean(dim=(1, 2, 3)) + self.offset

A config names it by its registered name, by the name of an installed plugin (an entry point of
group ``rlrestore.rewards``, registered under that name on first use) or by a
``package.module:Class`` path (an unregistered class then reports under its ``name`` attribute, by
default the class name), and passes the constructor's keyword arguments in ``args``; the reward
actor supplies ``device``::

    stage2:
      rewards:
        - {name: brightness, weight: 1.0, args: {offset: 0.5}}
        - {name: my_pkg.rewards:Aesthetic, weight: 0.5}

A plugin package declares its rewards in its ``pyproject.toml`` (see ``examples/reward_plugin``)::

    [project.entry-points."rlrestore.rewards"]
    colourfulness = "rlrestore_colourfulness:Colourfulness"

Conventions every reward follows:

- images are float ``[N, 3, H, W]`` RGB in [-1, 1] (the policy's output range; values outside
  may occur and each reward decides how to treat them, the built-ins clamp);
- ``score`` returns one finite number per image, ``[N]``; higher is better after
  orientation: a reward whose metric is lower-is-better sets ``higher_is_better = False`` and
  ``Reward.__call__`` negates its scores, so callers only ever see higher-is-better numbers;
- a reward may return NaN for an image it cannot score (the aggregator drops that sample),
  and may raise for a batch it cannot score (its error policy decides what follows:
  ``stage2.faults.reward_errors``, ``rewards.worker``);
- ``min_size`` is the smallest image side it can score; ``Reward.__call__`` refuses smaller images
  with a ValueError naming both (``rlrestore eval`` leaves them unscored or upscales them);
- ``resources`` says what one instance needs where it runs (``num_cpus``, ``num_gpus``,
  ``memory`` in bytes); a reward actor reserves the sum over the rewards it hosts unless the
  config sets its resources (``rewards.worker.make_reward_actor``);
- ``autocast = True`` lets the reward actor score it under ``torch.autocast`` when the run's
  ``precision`` is mixed (big networks whose score tolerates bf16 matmuls); the default is float32.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from rlrestore.config import RewardSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "RESOURCE_KEYS",
    "PyiqaReward",
    "Reward",
    "RewardBatch",
    "RewardError",
    "build_reward",
    "check_reward_args",
    "check_reward_weights",
    "plugin_rewards",
    "register_reward",
    "registered_rewards",
    "reward_class",
    "reward_name",
    "to_unit_range",
]

RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")
ENTRY_POINT_GROUP = "rlrestore.rewards"


class RewardError(ValueError):
    """A reward could not be resolved, built or called as configured; the message says which and why."""


@dataclass
class RewardBatch:
    """What a reward may know about the images it scores, one entry per image.

    ``captions``: the caption of each face ("" when there is none; text rewards then use their
    own fixed prompt). ``clean``: the clean (ground-truth) faces, float ``[N, 3, H, W]`` in
    [-1, 1], or None when the caller has none (rewards with ``needs_clean`` refuse such a
    batch). ``metadata``: one free-form dict per image (ids, degradation parameters, ...);
    None means empty dicts.
    """

    captions: list[str]
    clean: Tensor | None = None
    metadata: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        count = len(self.captions)
        if self.metadata is None:
            self.metadata = [{} for _ in range(count)]
        if len(self.metadata) != count:
            raise ValueError(f"RewardBatch has {count} captions but {len(self.metadata)} metadata entries")
        if self.clean is not None and (
            self.clean.ndim != 4 or self.clean.shape[0] != count or self.clean.shape[1] != 3
        ):
            raise ValueError(
                f"RewardBatch.clean must be [{count}, 3, H, W] (one clean face per caption), "
                f"got shape {tuple(self.clean.shape)}"
            )

    def __len__(self) -> int:
        return len(self.captions)

    def select(self, start: int, stop: int) -> RewardBatch:
        """The samples ``start:stop`` (a chunk of a larger call)."""
        clean = None if self.clean is None else self.clean[start:stop]
        return RewardBatch(self.captions[start:stop], clean, self.metadata[start:stop])

    def to(self, device: torch.device | str) -> RewardBatch:
        """The same batch with the clean faces on ``device``."""
        return self if self.clean is None else replace(self, clean=self.clean.to(device))


class Reward(ABC):
    """A batched reward model; subclasses implement :meth:`score` and set the class attributes.

    Call an instance (``reward(images, batch)``) rather than ``score``: the call checks the
    inputs, moves them to the reward's device, runs ``score`` without gradients, checks that
    it returned one value per image, orients it (higher is better) and returns float32 on CPU.
    """

    name: ClassVar[str]
    """Key of the reward's scores and metrics (``reward/<name>/mean``); set by :func:`register_reward`."""
    needs_clean: ClassVar[bool] = False
    """True for fidelity rewards, which compare each image with ``batch.clean``."""
    higher_is_better: ClassVar[bool] = True
    """False for a lower-is-better metric; ``__call__`` then negates what ``score`` returns."""
    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.25, "num_gpus": 0.0}
    """What one instance needs where it runs (keys from ``RESOURCE_KEYS``; ``memory`` in bytes)."""
    min_size: ClassVar[int] = 1
    """Smallest image side (pixels) the reward can score; ``__call__`` refuses smaller images."""
    autocast: ClassVar[bool] = False
    """True: under a mixed ``precision`` the reward actor scores it inside ``torch.autocast`` to the
    compute dtype (its weights stay as built). False (the default): always float32."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__
        unknown = set(cls.resources) - set(RESOURCE_KEYS)
        if unknown:
            raise TypeError(
                f"reward {cls.__name__}: unknown resource keys {sorted(unknown)}; use {RESOURCE_KEYS}"
            )

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @classmethod
    def missing_weights(cls, **args: Any) -> list[str]:
        """Weight files that building this reward with ``args`` would need and cannot find.

        Each entry names what is missing, what to download and where to put it. The default
        (rewards without weights) is ``[]``; model-based rewards override it so that a run
        fails before any actor starts, listing every missing file (:func:`check_reward_weights`).
        """
        return []

    @abstractmethod
    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        """Scores ``[N]`` of ``images`` (``[N, 3, H, W]`` in [-1, 1], on ``self.device``)."""

    def __call__(self, images: Tensor, batch: RewardBatch) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"reward {self.name!r} expects float images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if len(batch) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but a batch of {len(batch)}")
        if min(images.shape[-2:]) < self.min_size:
            raise ValueError(
                f"reward {self.name!r} needs images of at least {self.min_size} px per side, "
                f"got {tuple(images.shape[-2:])}"
            )
        if self.needs_clean and batch.clean is None:
            raise ValueError(
                f"reward {self.name!r} compares each image with its clean face, but batch.clean is None; "
                "pass the clean faces in RewardBatch(clean=...) or drop this reward"
            )
        with torch.no_grad():
            scores = self.score(images.to(self.device), batch.to(self.device))
        if not isinstance(scores, Tensor) or scores.shape != (images.shape[0],):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"reward {self.name!r} must return one score per image ({images.shape[0]},), got {shape}"
            )
        scores = scores.detach().float().cpu()
        return scores if self.higher_is_better else -scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r})"


def to_unit_range(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamping values outside (as when the images are saved)."""
    return images.clamp(-1.0, 1.0).add(1.0).div(2.0)


class PyiqaReward(Reward):
    """Adapter for a pyiqa metric (``pyiqa.create_metric(metric_name, as_loss=False)``).

    Images (and, for full-reference metrics, the clean faces) go to the metric in [0, 1];
    ``metric_options`` override the metric's defaults (pyiqa's ``metric_opts``). pyiqa is
    imported on construction, so importing this package stays cheap.
    """

    metric_name: ClassVar[str]

    def __init__(self, device: torch.device | str = "cpu", **metric_options: Any) -> None:
        super().__init__(device)
        import pyiqa
        from pyiqa.utils.logger import get_root_logger

        from rlrestore.runtime.console import route_logger

        get_root_logger()  # pyiqa's logger, with the terminal handler it adds once ...
        route_logger("pyiqa")  # ... which goes: "Network [PSNR] is created" reaches the log file only
        self.metric = pyiqa.create_metric(
            self.metric_name, device=self.device, as_loss=False, **metric_options
        )

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        if self.needs_clean:
            if batch.clean.shape != images.shape:
                raise ValueError(
                    f"reward {self.name!r}: clean faces {tuple(batch.clean.shape)} and images "
                    f"{tuple(images.shape)} must have the same shape"
                )
            return self.metric(to_unit_range(images), to_unit_range(batch.clean)).reshape(-1)
        return self.metric(to_unit_range(images)).reshape(-1)


_REGISTRY: dict[str, type[Reward]] = {}


def register_reward(name: str):
    """Class decorator: register a :class:`Reward` subclass under ``name`` (also its ``name``)."""

    def decorator(cls: type[Reward]) -> type[Reward]:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"register_reward({name!r}) decorates Reward subclasses, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"reward name {name!r} is taken by {known.__module__}:{known.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_rewards() -> list[str]:
    """Names usable in ``RewardSpec.name`` without a ``module:Class`` path, sorted."""
    return sorted(_REGISTRY)


def plugin_rewards() -> list[str]:
    """Names of the installed plugin rewards (entry points of group ``rlrestore.rewards``), sorted."""
    return sorted({entry.name for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def reward_class(name: str) -> type[Reward]:
    """Resolve a name to a Reward subclass: the registry first, then the installed entry points
    of group ``rlrestore.rewards``; a name with a colon is a ``package.module:Class`` path."""
    if ":" not in name:
        if name in _REGISTRY:
            return _REGISTRY[name]
        plugin = _plugin_class(name)
        if plugin is None:
            raise RewardError(
                f"unknown reward {name!r}; registered rewards: {', '.join(registered_rewards())}; "
                f"installed plugins (entry points {ENTRY_POINT_GROUP!r}): "
                f"{', '.join(plugin_rewards()) or 'none'} (or give a 'package.module:Class' path)"
            )
        return plugin
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward path {name!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward {name!r}: cannot import module {module_name!r} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _checked_class(obj, f"reward {name!r}")


def _plugin_class(name: str) -> type[Reward] | None:
    """The class of the entry point ``name`` (registered under that name), or None if none is installed."""
    entries = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name))
    if not entries:
        return None
    sources = sorted({f"{_distribution(entry)} ({entry.value})" for entry in entries})
    if len(sources) > 1:
        raise RewardError(
            f"reward {name!r} is declared by several installed plugins: {', '.join(sources)}; "
            "uninstall all but one"
        )
    entry = entries[0]
    where = f"plugin reward {name!r} (entry point {entry.value!r} of distribution {_distribution(entry)!r})"
    try:
        obj = entry.load()
    except Exception as exc:  # any import-time failure of a plugin is reported the same way
        raise RewardError(
            f"{where} failed to load: {type(exc).__name__}: {exc}; reinstall the plugin or its dependencies"
        ) from exc
    return register_reward(name)(_checked_class(obj, where))


def _distribution(entry: importlib.metadata.EntryPoint) -> str:
    return entry.dist.name if entry.dist is not None else "unknown"


def _checked_class(obj: Any, where: str) -> type[Reward]:
    if not (isinstance(obj, type) and issubclass(obj, Reward)) or inspect.isabstract(obj):
        raise RewardError(f"{where} is not a concrete subclass of rewards.Reward (got {obj!r})")
    return obj


def reward_name(spec: RewardSpec) -> str:
    """Key under which the reward of ``spec`` reports its scores (its class's ``name``)."""
    return reward_class(spec.name).name


def check_reward_weights(specs: list[RewardSpec]) -> None:
    """Raise one :class:`RewardError` listing every weight file the rewards of ``specs`` miss."""
    missing = [
        f"- reward {spec.name!r}: {item}"
        for spec in specs
        for item in reward_class(spec.name).missing_weights(**spec.args)
    ]
    if missing:
        raise RewardError(
            "reward weights are missing (nothing is downloaded at run time):\n" + "\n".join(missing)
        )


def check_reward_args(spec: RewardSpec) -> type[Reward]:
    """The reward class of ``spec``, after checking that ``spec.args`` fit its constructor
    (nothing is built: cheap enough to run before any actor starts)."""
    cls = reward_class(spec.name)
    if "device" in spec.args:
        raise RewardError(
            f"reward {spec.name!r}: 'device' is set by the reward actor, not in args; remove it from args"
        )
    signature = inspect.signature(cls.__init__)
    try:
        signature.bind(None, device="cpu", **spec.args)
    except TypeError as exc:
        accepted = [p for p in signature.parameters if p not in ("self", "device")]
        raise RewardError(
            f"reward {spec.name!r}: bad args {spec.args} ({exc}); it accepts {accepted or 'no arguments'}"
        ) from exc
    return cls


def build_reward(spec: RewardSpec, device: torch.device | str = "cpu") -> Reward:
    """Instantiate the reward of ``spec`` on ``device`` with ``spec.args`` as keyword arguments."""
    cls = check_reward_args(spec)
    try:
        return cls(device=device, **spec.args)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward {spec.name!r} with args {spec.args}: {exc}") from exc
