"""FID, the set-level metric: pyiqa's clean-FID of each checkpoint's restorations against the
clean set (or ``--reference``), and the Inception weights it needs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from rlrestore.orchestration.evaluation.inputs import EvalInputs

if TYPE_CHECKING:
    from rlrestore.orchestration.evaluation.metrics import Metric


def fid_weights() -> Any:
    """The Inception-v3 file pyiqa's ``fid`` reads (a ``rewards.iqa.WeightFile``)."""
    from pyiqa.archs.inception import FID_WEIGHTS_URL
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    from rewards.iqa import WeightFile

    name = Path(urlparse(FID_WEIGHTS_URL).path).name
    return WeightFile(
        "FID Inception-v3 (pt_inception-2015-12-05)", FID_WEIGHTS_URL, Path(DEFAULT_CACHE_DIR) / name
    )


def frechet_inception_distance(images: Path, reference: Path, device: torch.device) -> float:
    """pyiqa's clean-FID (Inception-v3 pool features, Fréchet distance) between two image folders."""
    import pyiqa

    metric = pyiqa.create_metric("fid", device=device)
    return float(metric(str(images), str(reference), mode="clean", num_workers=0, verbose=False))


def set_level_metrics(
    metrics: list[Metric],
    models: Sequence[str],
    out: Path,
    inputs: EvalInputs,
    reference: str | Path | None,
    device: torch.device,
    notes: list[dict[str, Any]],
) -> dict[str, dict[str, float]]:
    """FID of each model's restorations (``input``: the degraded inputs) against ``reference``
    (default: the clean set)."""
    values: dict[str, dict[str, float]] = {model: {} for model in models}
    if not any(metric.key == "fid" for metric in metrics):
        return values
    against = Path(reference) if reference is not None else inputs.gt_dir
    for model in models:
        try:
            values[model]["fid"] = frechet_inception_distance(out / "restored" / model, against, device)
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable reference file: reported, not fatal
            values[model]["fid"] = math.nan
            reason = f"FID failed ({type(exc).__name__}: {exc})"
            notes.append({"model": model, "metric": "fid", "reason": reason, "images": len(inputs.ids)})
    return values
