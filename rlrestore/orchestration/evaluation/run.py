"""The ``rlrestore eval`` driver: plan the metrics, prepare the inputs, restore and score the
chunks (here or on ``eval.actors.num_actors`` Ray actors), merge, add FID, summarise."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rlrestore.config import RunConfig
from rlrestore.data import load_image
from rlrestore.orchestration.evaluation.fid import set_level_metrics
from rlrestore.orchestration.evaluation.inputs import (
    INPUT_MODEL,
    Dial,
    EvalInputs,
    dial_models,
    parse_checkpoints,
    prepare_inputs,
)
from rlrestore.orchestration.evaluation.metrics import Metric, plan_metrics
from rlrestore.orchestration.evaluation.report import (
    EvalReport,
    best_models,
    summarize,
    write_grid,
    write_quality_curve,
    write_summaries,
)
from rlrestore.orchestration.evaluation.store import (
    PER_IMAGE,
    ChunkPlan,
    check_manifest,
    merge_parts,
    plan_chunks,
    save_chunk,
)
from rlrestore.orchestration.evaluation.worker import ChunkTask, EvalWorker
from rlrestore.runtime.devices import check_cluster_gpus, check_run_devices, local_device, write_devices

log = logging.getLogger(__name__)


def run_evaluation(
    config: RunConfig,
    checkpoints: Sequence[str],
    data: str | Path,
    out: str | Path,
    *,
    real: bool = False,
    reference: str | Path | None = None,
    progress: bool = True,
    qualities: Sequence[float] | None = None,
    base: str | Path | None = None,
    baseline: bool = True,
) -> EvalReport:
    """Restore ``data`` with every checkpoint (``[NAME=]PATH``), score, summarise; resumes in ``out``.

    ``real``: ``data`` holds real low-quality faces (no ground truth); otherwise clean faces that
    are degraded with Eq. 16. ``reference``: folder of clean faces FID compares against (default:
    the clean set of a synthetic evaluation). ``qualities``: sweep the fidelity-quality dial, each
    checkpoint evaluated once per s as ``NAME@s=S`` (weights F + s (Q - F), F is ``base`` or the
    run's Stage 1.2 policy), and ``quality_curve.png`` drawn. ``baseline``: the tables open with the
    ``input`` row, the degraded input scored as it is (never marked best: it is not a checkpoint).
    """
    check_run_devices(config, ["eval"])
    models = parse_checkpoints(checkpoints)
    dials: dict[str, Dial] = {}
    if qualities:
        models, dials = dial_models(models, qualities, base)
    described = {
        name: str(path) if name not in dials else _dial_description(path, dials[name]) for name, path in models.items()
    }
    out = Path(out)
    ev = config.eval
    if reference is not None and not Path(reference).is_dir():
        raise FileNotFoundError(f"--reference {reference} does not exist or is not a directory")
    metrics, skipped_metrics = plan_metrics(ev, has_gt=not real, has_reference=reference is not None)
    settings = _settings(config, data, real, metrics)
    out.mkdir(parents=True, exist_ok=True)
    check_manifest(out, settings, described)
    inputs = prepare_inputs(Path(data), out, real, config, progress)
    check_manifest(out, {**settings, "inputs": inputs.ids}, described)

    rows = [INPUT_MODEL, *models] if baseline else list(models)
    plan = plan_chunks(out, rows, inputs.ids, ev)
    columns = [metric.key for metric in metrics if metric.reward is not None]
    _compute_chunks(config, metrics, models, dials, inputs, out, plan, columns, progress)

    per_image, notes = merge_parts(out, plan.tasks, columns)
    per_image.to_parquet(out / PER_IMAGE, index=False)
    # FID runs in this process: with eval actors (on other nodes, maybe) on a GPU only if it has one.
    fid_device = local_device("auto" if ev.actors.num_actors > 0 and config.device == "cuda" else config.device)
    set_level = set_level_metrics(metrics, rows, out, inputs, reference, fid_device, notes)
    summary = summarize(per_image, metrics, set_level, rows)
    best = best_models(summary[summary["model"] != INPUT_MODEL], metrics)
    grid = write_grid(out, inputs, list(models), ev.seed, ev.grid_images) if len(models) > 1 else None
    report = EvalReport(
        out=out,
        kind=settings["kind"],
        models=described,
        metrics=metrics,
        skipped_metrics=skipped_metrics,
        skipped_inputs=inputs.skipped,
        notes=notes,
        per_image=per_image,
        summary=summary,
        best=best,
        computed=[(model, index) for model, index, _ in plan.pending],
        reused=plan.reused,
        grid=grid,
    )
    if dials:
        trained = [spec.name for spec in config.stage2.rewards if spec.weight > 0]
        write_quality_curve(report, {name: dial.quality for name, dial in dials.items()}, trained)
    write_summaries(report)
    return report


def _dial_description(policy_dir: Path, dial: Dial) -> str:
    """What a ``--quality`` row restores with, as the manifest and the summaries record it."""
    if dial.base_dir is None:
        return f"{policy_dir} at s=1 (Q as saved)"
    return f"{policy_dir} at s={dial.quality:g} from F={dial.base_dir}"


def _settings(config: RunConfig, data: str | Path, real: bool, metrics: list[Metric]) -> dict[str, Any]:
    """What every run into one ``OUT`` must share (the manifest refuses a change)."""
    return {
        "data": str(Path(data).resolve()),
        "kind": "real" if real else "synthetic",
        "degradation": None if real else config.degradation.model_dump(mode="json"),
        "sampler": config.sampler.model_dump(mode="json"),
        "precision": config.precision,
        "eval": config.eval.model_dump(
            include={"seed", "samples", "noise_seed", "batch_size", "chunk_size", "upscale_small"}
        ),
        "metrics": {metric.key: metric.reward.args for metric in metrics if metric.reward is not None},
    }


def _compute_chunks(
    config: RunConfig,
    metrics: list[Metric],
    models: dict[str, Path],
    dials: dict[str, Dial],
    inputs: EvalInputs,
    out: Path,
    plan: ChunkPlan,
    columns: list[str],
    progress: bool,
) -> None:
    """Restore and score the pending chunks, in this process or on Ray actors, saving each as it ends."""
    ev = config.eval

    def load(task: tuple[str, int, list[str]]) -> ChunkTask:
        model, index, ids = task
        gt = None if inputs.gt_dir is None else [load_image(inputs.gt_dir / f"{i}.png") for i in ids]
        lq = [load_image(inputs.lq_dir / f"{i}.png") for i in ids]
        dial = dials.get(model, Dial(None, 1.0))
        base_dir = None if dial.base_dir is None else str(dial.base_dir)
        policy_dir = None if model == INPUT_MODEL else str(models[model])
        captions = [inputs.captions[i] for i in ids]
        return ChunkTask(model, policy_dir, index, ids, captions, lq, gt, base_dir, dial.quality)

    bar = tqdm(total=len(plan.tasks), initial=len(plan.reused), desc="eval chunks", disable=not progress)
    if plan.pending:
        log.info("eval: %d chunk(s) done earlier, %d to compute", len(plan.reused), len(plan.pending))
        worker_args = (metrics, config.sampler, ev, config.device, config.precision)
        if ev.actors.num_actors == 0:
            worker = EvalWorker(*worker_args)
            write_devices(out, "eval", [worker.device_record("local")])
            for task in plan.pending:
                save_chunk(out, worker.run(load(task)), columns)
                bar.update(1)
        else:
            run_on_ray(config, worker_args, plan.pending, load, out, columns, bar)
    bar.close()


def run_on_ray(
    config: RunConfig,
    worker_args: tuple[Any, ...],
    pending: list[tuple[str, int, list[str]]],
    load: Callable[[tuple[str, int, list[str]]], ChunkTask],
    out: Path,
    columns: list[str],
    bar: tqdm,
) -> None:
    """Run ``pending`` chunks on ``eval.actors.num_actors`` Ray actors, one chunk in flight per actor (its
    images go through the object store), saving each result here as it arrives."""
    import ray

    from rlrestore.orchestration.jobs import ray_session

    ev = config.eval
    with ray_session(config.ray):
        check_cluster_gpus(config, ["eval"])
        actor_class = ray.remote(EvalWorker).options(num_cpus=ev.actors.num_cpus, num_gpus=ev.actors.num_gpus)
        threads = max(1, int(ev.actors.num_cpus))
        actors = [
            actor_class.remote(*worker_args, num_gpus=ev.actors.num_gpus, threads=threads)
            for _ in range(min(ev.actors.num_actors, len(pending)))
        ]
        queue = deque(pending)
        running: dict[Any, Any] = {}

        def submit(actor: Any) -> None:
            if queue:
                running[actor.run.remote(load(queue.popleft()))] = actor

        try:
            records = ray.get([actor.device_record.remote(f"actor {i}") for i, actor in enumerate(actors)])
            write_devices(out, "eval", records)
            for actor in actors:
                submit(actor)
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor = running.pop(ref)
                save_chunk(out, ray.get(ref), columns)
                bar.update(1)
                submit(actor)
        finally:
            for actor in actors:
                ray.kill(actor)
