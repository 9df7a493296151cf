"""``rlrestore eval``: restore a test set with one or more checkpoints and score every restoration.

The test set is either synthetic (clean faces degraded with Eq. 16, each seeded by a hash of
``eval.seed`` and its id, as CelebA-Test is made; the clean faces are the ground truth) or a folder
of real low-quality faces (no ground truth, so full-reference metrics are skipped). ``--data`` is
a folder of images (searched recursively) or a directory of Parquet shards from ``data build``
(their captions then reach the policy and the text metrics).

Every per-image metric is a reward of the reward registry (``rewards``), reported as its raw
value (a lower-is-better reward's negation is undone); ``deg`` is the angle in degrees between the
ArcFace embeddings of the ``identity`` reward, ``fid`` is set-level (pyiqa's Inception FID of each
checkpoint's restorations against the clean set or ``--reference``). A metric is skipped, with the
reason in every summary, when its weights are missing (e.g. ``lmd``: facexlib's AWing FAN landmark
weights, ``rewards.landmarks``) or when it needs ground truth on a real set.

Work is split into chunks of ``eval.chunk_size`` inputs per checkpoint, run in this process or on
``eval.actors.num_actors`` Ray actors; a chunk's rows are saved when it completes, so a rerun of the same
command skips finished chunks.

Devices and numerics: an eval actor runs on the GPU Ray assigned it when ``eval.actors.num_gpus`` > 0,
else on the CPU; in-process evaluation uses CUDA when ``device`` is ``cuda`` or ``auto`` with a
GPU present (``rlrestore.runtime.devices``). The policy is loaded in float32 and cast to the compute dtype
of ``precision`` (bf16 under bf16-mixed; the sampler state and t stay float32); the metrics always
compute in float32, so numbers stay comparable across precisions.

Modules: ``metrics`` (which metrics run, and why others are skipped), ``inputs`` (the test set and
the checkpoints), ``worker`` (restore and score a chunk), ``store`` (the files under ``OUT``,
resume), ``fid`` (the set-level metric), ``report`` (summary tables, grid), ``run`` (the driver).
Layout of ``OUT``::

    eval_manifest.json                  settings and checkpoints; a rerun with other settings is refused
    devices.json                        device, node and dtype of each eval worker (rlrestore.runtime.devices)
    inputs.json                         every input (id, source, Eq. 16 parameters) and skipped files
    inputs/lq/<id>.png, inputs/gt/<id>.png   what the policy restored, and the ground truth
    restored/<model>/<id>_s<seed>.png   every restoration (model ``input``: the degraded input)
    parts/<model>/chunk-00000.parquet   per-image rows of one chunk (written last, atomically)
    per_image.parquet                   model, image, seed, one column per metric (raw values)
    summary.csv, summary.md, summary.json   the ``input`` row (the degraded input, the baseline;
                                        never best), then one row per checkpoint, best per metric marked
    grid.png                            LQ | checkpoints | GT, with two or more checkpoints
"""

from rlrestore.orchestration.evaluation.inputs import (
    INPUT_MODEL,
    EvalInputs,
    parse_checkpoints,
    prepare_inputs,
)
from rlrestore.orchestration.evaluation.metrics import Metric, plan_metrics, with_stage2_rewards
from rlrestore.orchestration.evaluation.report import EvalReport, best_models, format_value, summarize
from rlrestore.orchestration.evaluation.run import run_evaluation
from rlrestore.orchestration.evaluation.worker import ChunkResult, ChunkTask, EvalWorker

__all__ = [
    "INPUT_MODEL",
    "ChunkResult",
    "ChunkTask",
    "EvalInputs",
    "EvalReport",
    "EvalWorker",
    "Metric",
    "best_models",
    "format_value",
    "parse_checkpoints",
    "plan_metrics",
    "prepare_inputs",
    "run_evaluation",
    "summarize",
    "with_stage2_rewards",
]
