"""Stage 2 rewards: the reward interface and registry, built-in rewards, reward actors, aggregation.

Built-in rewards (no weights needed): ``psnr`` and ``ssim`` (fidelity to the clean face,
pyiqa), ``sharpness`` (mean Sobel gradient of the luma) and ``piqe`` (negated pyiqa PIQE).
Other rewards subclass :class:`Reward` and are named in the config by registered name or by
``package.module:Class`` path (see ``rewards.base``).
"""

from rewards.aggregate import AggregateResult, RewardAggregator
from rewards.base import (
    PyiqaReward,
    Reward,
    RewardBatch,
    RewardError,
    build_reward,
    check_reward_weights,
    register_reward,
    registered_rewards,
    reward_class,
    reward_name,
    to_unit_range,
)
from rewards.fidelity import PSNR, SSIM
from rewards.quality import PIQE, Sharpness, luminance, mean_gradient_magnitude
from rewards.worker import (
    RewardActor,
    RewardWorker,
    collect_scores,
    make_reward_actor,
    reward_resources,
    submit_scores,
)

__all__ = [
    "PIQE",
    "PSNR",
    "SSIM",
    "AggregateResult",
    "PyiqaReward",
    "Reward",
    "RewardActor",
    "RewardAggregator",
    "RewardBatch",
    "RewardError",
    "RewardWorker",
    "Sharpness",
    "build_reward",
    "check_reward_weights",
    "collect_scores",
    "luminance",
    "make_reward_actor",
    "mean_gradient_magnitude",
    "register_reward",
    "registered_rewards",
    "reward_class",
    "reward_name",
    "reward_resources",
    "submit_scores",
    "to_unit_range",
]
