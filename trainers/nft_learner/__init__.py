"""Stage 2 learner: DeepSpeed ranks that minimise the DiffusionNFT loss on a policy's velocity model.

* ``samples``: :class:`NFTSamples`, a step's candidates with one condition per input, and their
  split over ranks (:class:`StepSamples`, by reference to the rollout parts);
* ``engine``: DeepSpeed set-up (process group, engine config, weights-only checkpoint loading);
* ``learner``: :class:`NFTLearner`, one rank (the loss, the v_old EMA, weights, checkpoints);
* ``group``: :class:`LearnerGroup`, the ranks as Ray actors in one torch.distributed group (gloo on
  CPU, nccl on GPU), what the Stage 2 driver uses.
"""

from rlrestore.runtime.console import import_quietly

import_quietly("deepspeed", loggers=["DeepSpeed"])  # before the modules that import it: its import prints

from trainers.nft_learner.group import LearnerActor, LearnerGroup, LearnerLost, gather
from trainers.nft_learner.learner import NFTLearner
from trainers.nft_learner.samples import NFTSamples, StepSamples, StepShare, split_samples

__all__ = [
    "LearnerActor",
    "LearnerGroup",
    "LearnerLost",
    "NFTLearner",
    "NFTSamples",
    "StepSamples",
    "StepShare",
    "gather",
    "split_samples",
]
