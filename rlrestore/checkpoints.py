"""Run-directory layout and atomic checkpoints.

    <run_dir>/config.yaml                     resolved config of the latest command
    <run_dir>/data/                           Parquet shards built from the embedded faces
    <run_dir>/checkpoints/<stage>/step_000100/{policy/, trainer_state.pt}
                                              (Stage 1 also step_summary.json: step, seconds, why it stopped)
    <run_dir>/metrics/<stage>/part-*.parquet  per-step metrics
    <run_dir>/wandb/                          W&B (offline by default)

A checkpoint is written into a temporary sibling directory and renamed into place, so a kill
during the write leaves the previous checkpoint as the latest usable one.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from rlrestore.models.loading import CheckpointError
from rlrestore.policies.base import POLICY_CONFIG, RestorationPolicy

STAGES = ("stage1.1", "stage1.2", "stage2")
STEP_DIR = re.compile(r"^step_(\d{6,})$")
TRAINER_STATE = "trainer_state.pt"
STEP_SUMMARY = "step_summary.json"  # a Stage 1 checkpoint's step, seconds of steps and whether max_seconds ended it


def checkpoint_root(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage


def list_checkpoints(run_dir: str | Path, stage: str) -> list[tuple[int, Path]]:
    """Complete checkpoints of a stage as (step, path), oldest first."""
    root = checkpoint_root(run_dir, stage)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file() and (child / "policy" / POLICY_CONFIG).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path, stage: str) -> Path | None:
    found = list_checkpoints(run_dir, stage)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    stage: str,
    step: int,
    policy: RestorationPolicy | Callable[[Path], None],
    state: dict[str, Any],
    keep: int,
    extra: Callable[[Path], None] | None = None,
    protect: Collection[Path] = (),
) -> Path:
    """Atomically write policy + trainer state (+ whatever ``extra`` writes into the checkpoint
    directory) for ``step``, and keep the newest ``keep`` checkpoints and those in ``protect``
    (e.g. a run's best one). ``policy`` is a policy to save, or a function that writes the policy
    directory it is given."""
    root = checkpoint_root(run_dir, stage)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(policy, RestorationPolicy):
        policy.save_pretrained(tmp / "policy")
    else:
        policy(tmp / "policy")
    torch.save(state, tmp / TRAINER_STATE)
    if extra is not None:
        extra(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    kept = {Path(path).resolve() for path in protect}
    for _, old in list_checkpoints(run_dir, stage)[:-keep]:
        if old.resolve() not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """Optimizer/scheduler/step state, loaded without executing pickled code."""
    path = checkpoint / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); delete {checkpoint} to fall back to an older one") from None


def resolve_policy_dir(path: str | Path) -> Path:
    """A policy directory from a policy dir, a checkpoint dir or a run dir (latest stage wins)."""
    path = Path(path)
    if (path / POLICY_CONFIG).is_file():
        return path
    if (path / "policy" / POLICY_CONFIG).is_file():
        return path / "policy"
    for stage in reversed(STAGES):
        checkpoint = latest_checkpoint(path, stage)
        if checkpoint is not None:
            return checkpoint / "policy"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raise CheckpointError(
        f"{path} holds no policy: expected a policy directory ({POLICY_CONFIG}), a checkpoint "
        f"(policy/{POLICY_CONFIG}) or a run directory with checkpoints/<stage>/step_*"
    )


def configured_policy_dir(checkpoint: str | None) -> Path | None:
    """``policy.checkpoint`` as a policy directory (None when unset); a path that holds no policy
    raises ``CheckpointError`` naming the key."""
    if checkpoint is None:
        return None
    try:
        return resolve_policy_dir(checkpoint)
    except CheckpointError as exc:
        raise CheckpointError(f"policy.checkpoint={checkpoint!r}: {exc}") from None


def stage2_base_policy_dir(policy_dir: str | Path, base: str | Path | None = None) -> Path:
    """F of the fidelity-quality dial: ``base`` (any path ``resolve_policy_dir`` takes) when given,
    else the Stage 1.2 policy the Stage 2 run of ``policy_dir`` started from (its run's newest
    ``checkpoints/stage1.2/step_*/policy``, the hand-off ``rlrestore train stage2`` builds its actors
    from). Raises ``CheckpointError`` naming what is missing."""
    if base is not None:
        return resolve_policy_dir(base).resolve()
    policy_dir = Path(policy_dir).resolve()
    checkpoint = policy_dir.parent
    if not (policy_dir.name == "policy" and STEP_DIR.match(checkpoint.name) and checkpoint.parent.name == "stage2"):
        raise CheckpointError(
            f"{policy_dir} is not a Stage 2 checkpoint's policy (<run>/checkpoints/stage2/step_*/policy), so "
            "its Stage 1 policy F cannot be found: pass F with --base"
        )
    run_dir = checkpoint.parent.parent.parent
    handoff = latest_checkpoint(run_dir, "stage1.2")
    if handoff is None:
        raise CheckpointError(
            f"the Stage 1 policy F of {policy_dir} is missing: {checkpoint_root(run_dir, 'stage1.2')} holds no "
            "checkpoint (a run started from policy.checkpoint, or its Stage 1.2 checkpoints were removed); "
            "pass F with --base"
        )
    return (handoff / "policy").resolve()
