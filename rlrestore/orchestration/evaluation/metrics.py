"""Which metrics an evaluation computes (``eval.metrics``), how each is reported, and why the
others are skipped.

Every per-image metric is a reward of the reward registry (``rewards``), reported as its raw value
(a lower-is-better reward's negation is undone); ``deg`` is the angle in degrees between the
ArcFace embeddings of the ``identity`` reward; ``fid`` is set-level (``evaluation.fid``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewards import RewardError, check_reward_args, reward_class
from rlrestore.config import ConfigError, EvalConfig, RewardSpec, Stage2Config
from rlrestore.orchestration.evaluation.fid import fid_weights

# Table labels and units of the paper's metrics; these names are skipped (not refused) when no
# reward of that name is available.
_KNOWN = {
    "psnr": ("PSNR", "dB"),
    "ssim": ("SSIM", ""),
    "ms_ssim": ("MS-SSIM", ""),
    "lpips": ("LPIPS", ""),
    "fid": ("FID", ""),
    "musiq": ("MUSIQ", ""),
    "clipiqa+": ("CLIPIQA+", ""),
    "maniqa": ("MANIQA", ""),
    "topiq_nr-face": ("topiq_nr-face", ""),
    "niqe": ("NIQE", ""),
    "brisque": ("BRISQUE", ""),
    "piqe": ("PIQE", ""),
    "deg": ("Deg", "°"),
    "lmd": ("LMD", "px"),
    "dlib_identity": ("dlib identity distance", ""),
    "dlib_lmd": ("dlib LMD", "× inter-ocular"),
    "hpsv2": ("HPSv2", ""),
    "pickscore": ("PickScore", ""),
    "clipscore": ("CLIP score", ""),
}


@dataclass(frozen=True)
class Metric:
    """One evaluated metric: how it is computed (``reward``; None for the set-level FID) and reported."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    needs_gt: bool
    reward: RewardSpec | None = None
    negate: bool = False  # the reward reports -metric (a lower-is-better metric): undo it
    angle: bool = False  # the reward's cosine is reported as the angle in degrees ("deg")
    min_size: int = 1  # smallest image side the reward can score

    @property
    def heading(self) -> str:
        """Column heading with unit and direction, e.g. ``PSNR (dB) ↑``."""
        unit = f" ({self.unit})" if self.unit else ""
        return f"{self.label}{unit} {'↑' if self.higher_is_better else '↓'}"

    def values(self, scores: torch.Tensor) -> torch.Tensor:
        """Raw metric values from the reward's (higher-is-better) scores."""
        raw = -scores if self.negate else scores
        return torch.rad2deg(torch.arccos(raw.clamp(-1.0, 1.0))) if self.angle else raw


def plan_metrics(
    config: EvalConfig, has_gt: bool, has_reference: bool
) -> tuple[list[Metric], dict[str, str]]:
    """The metrics of ``config.metrics`` that can run here, and the others with the reason each is skipped.

    Raises ``ConfigError`` for a name that is neither a registered reward nor a metric of the paper.
    """
    metrics: list[Metric] = []
    skipped: dict[str, str] = {}
    for key in config.metrics:
        args = config.metric_args.get(key, {})
        label, unit = _KNOWN.get(key, (key, ""))
        if key == "fid":
            if args:
                raise ConfigError(
                    f"eval.metric_args.fid = {args}: FID takes no args (its Inception weights are read from "
                    "pyiqa's cache, see the skip reason when they are missing)"
                )
            weights = fid_weights()
            if not (has_gt or has_reference):
                skipped[key] = (
                    "set-level metric against clean faces: a real set has none; pass --reference DIR "
                    "(e.g. FFHQ faces)"
                )
            elif not weights.present():
                skipped[key] = f"weights missing: {weights.instructions()}"
            else:
                metrics.append(Metric(key, label, unit, higher_is_better=False, needs_gt=False))
            continue
        reward_name = "identity" if key == "deg" else key
        try:
            cls = reward_class(reward_name)
        except RewardError as exc:
            if key not in _KNOWN:
                raise ConfigError(f"eval.metrics: {exc}") from None
            skipped[key] = f"not available here: {exc}"
            continue
        if cls.needs_clean and not has_gt:
            skipped[key] = (
                "full-reference metric (compares with the clean face); a real set has no ground truth"
            )
            continue
        try:
            missing = cls.missing_weights(**args)
        except TypeError as exc:
            raise ConfigError(f"eval.metric_args.{key} = {args}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. an optional package missing: the metric cannot run
            skipped[key] = f"cannot check its weights ({type(exc).__name__}: {exc})"
            continue
        if missing:
            skipped[key] = "weights missing: " + "; ".join(missing)
            continue
        try:
            check_reward_args(RewardSpec(name=reward_name, args=args))
        except RewardError as exc:
            raise ConfigError(f"eval.metric_args.{key}: {exc}") from None
        metrics.append(
            Metric(
                key,
                label,
                unit,
                higher_is_better=cls.higher_is_better and key != "deg",
                needs_gt=cls.needs_clean,
                reward=RewardSpec(name=reward_name, args=args),
                negate=not cls.higher_is_better,
                angle=key == "deg",
                min_size=cls.min_size,
            )
        )
    return metrics, skipped


def with_stage2_rewards(config: EvalConfig, stage2: Stage2Config) -> EvalConfig:
    """``config`` with the Stage 2 rewards (trained or guards) added to ``metrics`` after its own
    (their args as metric args), so a table of F against Q shows what Stage 2 optimised."""
    extra = [spec for spec in stage2.rewards if spec.name not in config.metrics]
    return config.model_copy(
        update={
            "metrics": [*config.metrics, *(spec.name for spec in extra)],
            "metric_args": {**config.metric_args, **{spec.name: spec.args for spec in extra if spec.args}},
        }
    )
