"""Stage 2 rewards: the reward interface and registry, built-in rewards, reward actors, aggregation.

Built-in rewards that need no downloaded weights: ``psnr`` and ``ssim`` (fidelity to the clean
face, pyiqa), ``sharpness`` (mean Sobel gradient of the luma), ``piqe`` (negated pyiqa PIQE),
``niqe`` and ``brisque`` (negated; parameters vendored / shipped by the ``brisque`` package) and
``dlib_identity`` / ``dlib_lmd`` (dlib's face models from ``face_recognition_models``).
``http`` scores with a remote scorer (``rewards.http``). Other rewards subclass :class:`Reward`
and are named in the config by registered name, installed plugin (entry point group
``rlrestore.rewards``) or ``package.module:Class`` path (see ``rewards.base``). How rewards share
reward actors and what happens when one fails: ``rewards.pool`` and ``rewards.worker``.

``serve`` scores with a Ray Serve application on the same cluster, called by handle
(``rewards.serving``, which also turns any reward into such an application).
"""

from rewards.aggregate import AggregateResult, RewardAggregator
from rewards.base import (
    PyiqaReward,
    Reward,
    RewardBatch,
    RewardError,
    build_reward,
    check_reward_args,
    check_reward_weights,
    plugin_rewards,
    register_reward,
    registered_rewards,
    reward_class,
    reward_name,
    to_unit_range,
)
from rewards.dlib_face import DlibIdentity, DlibLandmarkDistance
from rewards.fidelity import PSNR, SSIM
from rewards.http import HTTPReward
from rewards.identity import Identity, embedding_angle_degrees
from rewards.iqa import (
    BRISQUE,
    LPIPS,
    MANIQA,
    MSSSIM,
    MUSIQ,
    NIQE,
    CLIPIQAPlus,
    IqaReward,
    TOPIQFace,
    WeightFile,
)
from rewards.landmarks import LandmarkDistance
from rewards.pool import RewardActorPool, RewardErrorLog
from rewards.preference import CLIPScore, CLIPScoreImage, HPSv2, PickScore
from rewards.quality import PIQE, Sharpness, luminance, mean_gradient_magnitude
from rewards.serving import RewardDeployment, ScoreRequest, ServeReward, reward_application
from rewards.worker import (
    RewardActor,
    RewardWorker,
    collect_scores,
    make_reward_actor,
    reward_resources,
    submit_scores,
)

__all__ = [
    "BRISQUE",
    "LPIPS",
    "MANIQA",
    "MSSSIM",
    "MUSIQ",
    "NIQE",
    "PIQE",
    "PSNR",
    "SSIM",
    "AggregateResult",
    "CLIPIQAPlus",
    "CLIPScore",
    "CLIPScoreImage",
    "DlibIdentity",
    "DlibLandmarkDistance",
    "HPSv2",
    "HTTPReward",
    "Identity",
    "IqaReward",
    "LandmarkDistance",
    "PickScore",
    "PyiqaReward",
    "Reward",
    "RewardActor",
    "RewardActorPool",
    "RewardAggregator",
    "RewardBatch",
    "RewardDeployment",
    "RewardError",
    "RewardErrorLog",
    "RewardWorker",
    "ScoreRequest",
    "ServeReward",
    "Sharpness",
    "TOPIQFace",
    "WeightFile",
    "build_reward",
    "check_reward_args",
    "check_reward_weights",
    "collect_scores",
    "embedding_angle_degrees",
    "luminance",
    "make_reward_actor",
    "mean_gradient_magnitude",
    "plugin_rewards",
    "register_reward",
    "registered_rewards",
    "reward_application",
    "reward_class",
    "reward_name",
    "reward_resources",
    "submit_scores",
    "to_unit_range",
]
