"""The ``rlrestore`` command line: one config schema drives every subcommand.

rlrestore data build --src FACES --out SHARDS
rlrestore train {autoencoder,stage1.1,stage1.2,stage1} CONFIG [key=value ...]
rlrestore compare-control CONFIG [key=value ...]
rlrestore restore --ckpt RUN_OR_CHECKPOINT --out DIR [--device D] [--precision P] [--quality S] INPUT [INPUT ...]
rlrestore demo [key=value ...]
rlrestore eval [CONFIG | RUN_DIR] [--ckpt [NAME=]CKPT ...] --data DIR --out OUT [--real] [--quality S,...] [key=value ...]
rlrestore analyze determinism [CONFIG | RUN_DIR] --ckpt [NAME=]CKPT [--ckpt ...] --data DIR --out OUT [--seeds N]
rlrestore plot RUN_DIR
rlrestore config {show,keys} [CONFIG] [key=value ...]
rlrestore bench [CONFIG] [key=value ...] [--out FILE.json] [--repeats N] [--size tiny|medium] [--only PART] [--rewards A,B]
rlrestore convert {pref-restore,blip3o-next} [SRC] --out DIR [--sana DIR] [--ta-tok FILE]
rlrestore plan CONFIG [key=value ...] [--gpus N] [--gpu-memory 80GiB] [--tflops F] [--bandwidth B]
rlrestore serve-reward NAME [ARG=VALUE ...] [key=value ...] [--config CONFIG] [--app APP] [--host H] [--port P]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rlrestore.config import ConfigError, RunConfig, load_config
from rlrestore.orchestration.cli_tools import add_tool_parsers
from rlrestore.runtime.console import close_log_file, configure_console

STAGE1_SEQUENCE = ("autoencoder", "stage1.1", "stage1.2")
# Errors a user can fix from the message alone: printed without a traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, PermissionError)


def _config(args: argparse.Namespace) -> RunConfig:
    config = load_config(args.config, args.overrides)
    return config.model_copy(update={"run_dir": str(Path(config.run_dir).resolve())})


def cmd_data_build(args: argparse.Namespace) -> int:
    from rlrestore.data import build_shards

    report = build_shards(Path(args.src), Path(args.out), args.size, args.shard_size, progress=not args.quiet)
    print(report.summary())
    print(f"shards: {Path(args.out).resolve()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rlrestore.checkpoints import configured_policy_dir
    from rlrestore.orchestration.jobs import ray_session, run_stage1
    from rlrestore.policies.registry import check_stage, trains_in
    from rlrestore.runtime.devices import check_cluster_gpus, check_run_devices

    config = _config(args)
    if args.stage == "stage1":  # the policy's own Stage 1 stages that have steps
        stages = [
            s for s in STAGE1_SEQUENCE if config.stage(s).steps > 0 and trains_in(config.policy.type, s)
        ]
    else:
        stages = [args.stage]
        if args.stage != "stage2":
            check_stage(config.policy.type, args.stage)
    check_run_devices(config, stages)  # before Ray starts: each role's device request can be met
    configured_policy_dir(config.policy.checkpoint)
    if stages == ["stage2"]:
        from rlrestore.orchestration.stage2 import check_stage2_inputs

        check_stage2_inputs(config)  # before Ray starts: missing checkpoint, rewards, weight files
    log_path = run_log(Path(config.run_dir) / "logs")
    with ray_session(config.ray):
        check_cluster_gpus(config, stages)
        for stage in stages:
            if stage == "stage2":
                from rlrestore.orchestration.stage2 import run_stage2

                run_stage2(config)
            else:
                run_stage1(config, stage)
    print(f"run directory: {config.run_dir}")
    print(f"log file     : {log_path}")
    return 0


def cmd_compare_control(args: argparse.Namespace) -> int:
    from rlrestore.orchestration.control import check_control_inputs, run_control

    config = _config(args)
    check_control_inputs(config)  # before Ray starts: F, held-out faces, devices, Stage 2's inputs
    log_path = run_log(Path(config.run_dir) / "logs")
    report = run_control(config)
    print(report.summary())
    print(f"log file       : {log_path}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from rlrestore.orchestration.restore import restore_files

    # --steps goes through the same validation as any sampler key (model_copy would skip it).
    overrides = [f"sampler.{o}" for o in args.sampler]
    if args.steps is not None:
        overrides.append(f"sampler.steps={args.steps}")
    sampler = load_config(None, overrides).sampler
    report = restore_files(
        args.ckpt,
        args.inputs,
        args.out,
        sampler,
        samples=args.samples,
        seed=args.seed,
        progress=not args.quiet,
        device=args.device,
        precision=args.precision,
        quality=args.quality,
        base=args.base,
    )
    print(report.summary())
    for item in report.skipped:
        print(f"  skipped {item['path']}: {item['reason']}")
    print(f"outputs: {Path(args.out).resolve()}")
    return 0 if report.outputs else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from rlrestore.orchestration.demo import DEMO_CONFIG, run_demo

    config = load_config(args.config or DEMO_CONFIG, args.overrides)
    config = config.model_copy(update={"run_dir": str(Path(config.run_dir).resolve())})
    log_path = run_log(Path(config.run_dir) / "logs")
    run_demo(config)
    print(f"log file             : {log_path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rlrestore.orchestration.evaluation import run_evaluation

    config = load_config(*_eval_config_and_overrides(args))
    run_log(args.out)
    report = run_evaluation(
        config,
        args.ckpt,
        args.data,
        args.out,
        real=args.real,
        reference=args.reference,
        progress=config.logging.progress and not args.quiet,
        qualities=args.quality,
        base=args.base,
    )
    print(report.markdown())
    print(f"chunks computed {len(report.computed)}, reused {len(report.reused)}")
    print(f"per-image table: {report.out / 'per_image.parquet'}")
    print(f"summary        : {report.out / 'summary.csv'}, summary.md, summary.json")
    if report.grid is not None:
        print(f"grid           : {report.grid}")
    if report.quality_curve is not None:
        print(f"quality curve  : {report.quality_curve}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from rlrestore.orchestration.analysis import run_determinism

    config = load_config(*_eval_config_and_overrides(args))
    run_log(args.out)
    report = run_determinism(
        config,
        args.ckpt,
        args.data,
        args.out,
        real=args.real,
        seeds=args.seeds,
        progress=config.logging.progress and not args.quiet,
    )
    print(report.markdown())
    print(f"box plots: {report.plot}")
    print(f"spreads  : {Path(args.out) / 'determinism_spread.csv'}, determinism.md, determinism.json")
    return 0


def _eval_config_and_overrides(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The config of ``eval``/``analyze``: a YAML file as given, or a run's own ``config.yaml``
    (the positional RUN_DIR, else the run of the first ``--ckpt``); a RUN_DIR without ``--ckpt``
    evaluates that run's latest checkpoint. Sets ``args.ckpt`` accordingly."""
    target, overrides = args.config, list(args.overrides)
    if target is not None and "=" in target and not Path(target).exists():
        target, overrides = None, [target, *overrides]
    if target is not None and not Path(target).exists():
        raise FileNotFoundError(f"config or run directory {target} does not exist")
    if target is not None and Path(target).is_file():
        if not args.ckpt:
            raise ValueError(f"give --ckpt: with a config file ({target}) there is no run to evaluate")
        return Path(target), overrides
    if target is not None:
        args.ckpt = args.ckpt or [target]
        candidates = [Path(target)]
    elif args.ckpt:
        candidates = [Path(args.ckpt[0].split("=", 1)[-1])]
        candidates += [
            run for run in list(candidates[0].resolve().parents)[:4] if (run / "checkpoints").is_dir()
        ]
    else:
        raise ValueError("give a config file, a run directory or --ckpt (none given)")
    for folder in candidates:
        if (folder / "config.yaml").is_file():
            logging.getLogger(__name__).info("config: %s (the run's own)", folder / "config.yaml")
            return folder / "config.yaml", overrides
    raise FileNotFoundError(
        f"no config.yaml in {candidates[0]} (nor its run directory): pass a config file "
        f"as the first argument, e.g. rlrestore eval configs/tiny.yaml --ckpt {candidates[0]} ..."
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``rlrestore`` argument parser, one subcommand per ``cmd_*`` function."""
    parser = argparse.ArgumentParser(
        prog="rlrestore",
        description="Pref-Restore on Ray: data, Stage 1 alignment, restoration.",
        epilog="Config keys: `rlrestore config keys`. Overrides are key=value with dotted keys, e.g. stage1_1.steps=10.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _add_data_parser(sub)
    _add_train_parser(sub)
    _add_compare_control_parser(sub)
    _add_restore_parser(sub)
    _add_demo_parser(sub)
    _add_eval_parser(sub)
    add_tool_parsers(sub)
    _add_verbose(parser, top=True)
    return parser


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    """Face data tools: ``data build``."""
    data = sub.add_parser("data", help="Face data tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser(
        "build",
        help="Turn a folder of face images into Parquet shards (unreadable files are skipped and reported).",
    )
    build.add_argument("--src", required=True, help="Folder of PNG/JPEG/WebP faces (searched recursively).")
    build.add_argument(
        "--out", required=True, help="Output folder for shard-*.parquet, _manifest.json, _report.json."
    )
    build.add_argument(
        "--size", type=int, default=512, help="Side of the stored square images (default 512)."
    )
    build.add_argument("--shard-size", type=int, default=256, help="Images per shard (default 256).")
    build.add_argument("--quiet", action="store_true", help="No progress bar.")
    build.set_defaults(func=cmd_data_build)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """``train STAGE CONFIG [key=value ...]``."""
    train = sub.add_parser("train", help="Run a training stage as a Ray Train job (resumes automatically).")
    train.add_argument(
        "stage",
        choices=[*STAGE1_SEQUENCE, "stage1", "stage2"],
        help="autoencoder (optional DC-AE fit), stage1.1, stage1.2, stage1 = those with steps > 0 in order, "
        "or stage2 (DiffusionNFT on rollout, reward and learner actors; starts from the end of stage1.2).",
    )
    train.add_argument("config", help="YAML config file (see configs/).")
    train.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. ray.train_workers.num_actors=4."
    )
    train.set_defaults(func=cmd_train)


def _add_compare_control_parser(sub: argparse._SubParsersAction) -> None:
    """``compare-control CONFIG [key=value ...]``: Stage 2 against Stage 1.2 for the same time."""
    control = sub.add_parser(
        "compare-control",
        help="Did RL beat training Stage 1 longer? Stage 2 (reused when complete) and, from the same Stage-1 "
        "checkpoint F, Stage 1.2 for the same seconds of steps (RUN_DIR/control), then input, F, Q and the "
        "control scored on the held-out faces: control/table.md, report.json, control.png.",
    )
    control.add_argument("config", help="YAML config file of the run (as for `rlrestore train`).")
    control.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stage1_2.optim.lr=1e-4.")
    control.set_defaults(func=cmd_compare_control)


def _add_restore_parser(sub: argparse._SubParsersAction) -> None:
    """``restore``: any images with a checkpoint."""
    restore = sub.add_parser(
        "restore", help="Restore face images or folders with a checkpoint or run directory."
    )
    restore.add_argument("inputs", nargs="+", help="Image files and/or folders.")
    restore.add_argument(
        "--ckpt", required=True, help="Run directory, checkpoint directory or policy directory."
    )
    restore.add_argument("--out", required=True, help="Output folder.")
    restore.add_argument(
        "--samples", type=int, default=1, help="Candidates per input (K); each saved with its seed."
    )
    restore.add_argument(
        "--seed", type=int, default=0, help="Base seed (candidate seeds are consecutive from it)."
    )
    restore.add_argument("--steps", type=int, default=None, help="Sampler steps (default: sampler.steps).")
    restore.add_argument(
        "--sampler",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Sampler override (repeatable), e.g. --sampler guidance_scale=2 --sampler sde_eta=0.5.",
    )
    restore.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="Where the policy runs (default auto: the first GPU when there is one, else the CPU).",
    )
    restore.add_argument(
        "--precision",
        choices=["fp32", "bf16-mixed", "fp16-mixed"],
        default="fp32",
        help="Numerics (default fp32). bf16-mixed / fp16-mixed restore with bf16 / fp16 weights, the sampler "
        "state and t in float32: faster and half the memory on a GPU, outputs differ slightly.",
    )
    restore.add_argument(
        "--quality",
        type=_quality,
        default=1.0,
        metavar="S",
        help="Fidelity-quality dial s in [0, 1] (default 1): the Stage 2 weights become F + s (Q - F), F the "
        "Stage 1 policy the run started from (0 restores as F, 1 as Q; for LoRA runs, the LoRA scale).",
    )
    restore.add_argument(
        "--base",
        default=None,
        help="F for --quality < 1 (policy, checkpoint or run directory; default: the run's Stage 1.2 policy).",
    )
    restore.add_argument("--quiet", action="store_true", help="No progress bar.")
    restore.set_defaults(func=cmd_restore)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """``demo``: the whole pipeline on tiny models."""
    demo = sub.add_parser(
        "demo",
        help="Stage 2 from the pretrained tiny policy F, the Stage 1.2 control, F vs Q on held-back faces, the dial.",
    )
    demo.add_argument(
        "--config",
        default=None,
        help="Config (default: the embedded demo config, rlrestore/configs/demo.yaml).",
    )
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=runs/demo2.")
    demo.set_defaults(func=cmd_demo)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """``eval`` and ``analyze determinism`` (they share the eval arguments)."""
    evaluate = sub.add_parser(
        "eval",
        help="Restore a test set with one or more checkpoints and score them: per-image Parquet table, "
        "summary CSV/Markdown/JSON (skipped metrics with reasons), comparison grid. Resumes in OUT.",
    )
    _add_eval_arguments(evaluate)
    evaluate.add_argument(
        "--reference",
        default=None,
        help="Folder of clean faces FID compares against (default: the clean set).",
    )
    evaluate.add_argument(
        "--quality",
        type=_qualities,
        default=None,
        metavar="S[,S...]",
        help="Sweep the fidelity-quality dial, e.g. 0,0.25,0.5,0.75,1: each --ckpt NAME becomes one row "
        "NAME@s=S per value (weights F + s (Q - F)), and quality_curve.png plots fidelity against quality.",
    )
    evaluate.add_argument(
        "--base",
        default=None,
        help="F for --quality (policy, checkpoint or run directory; default: each run's Stage 1.2 policy).",
    )
    evaluate.set_defaults(func=cmd_eval)

    analyze = sub.add_parser("analyze", help="Analyses of checkpoints.")
    analyze_sub = analyze.add_subparsers(dest="analysis", required=True)
    determinism = analyze_sub.add_parser(
        "determinism",
        help="Restore each input under N seeds per checkpoint; per-input std of every metric, medians, "
        "box plots and a verdict against the first checkpoint (paper Fig. 8).",
    )
    _add_eval_arguments(determinism)
    determinism.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="Restorations per input N (default eval.determinism_seeds, 16).",
    )
    determinism.set_defaults(func=cmd_analyze)


def _quality(text: str) -> float:
    """argparse type of ``restore --quality``: s in [0, 1]."""
    from rlrestore.policies.blend import check_quality

    try:
        return check_quality(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _qualities(text: str) -> list[float]:
    """argparse type of ``eval --quality``: comma-separated s in [0, 1]."""
    from rlrestore.policies.blend import parse_qualities

    try:
        return parse_qualities(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        default=None,
        metavar="CONFIG | RUN_DIR",
        help="YAML config (sampler, degradation, eval section; see configs/), or a run directory: its own "
        "config.yaml, and its latest checkpoint when --ckpt is not given (default: the config.yaml of the "
        "run --ckpt points into).",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides (anywhere), e.g. eval.actors.num_actors=4 eval.samples=2.",
    )
    parser.add_argument(
        "--ckpt",
        action="append",
        default=None,
        metavar="[NAME=]CKPT",
        help="Checkpoint to evaluate (repeatable): run, checkpoint or policy directory, optionally named, "
        "e.g. --ckpt F=runs/x/checkpoints/stage1.2/step_000400 --ckpt Q=runs/x (default: RUN_DIR).",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="Folder of clean faces (degraded with Eq. 16, seeded) or Parquet shards; "
        "with --real, real low-quality faces.",
    )
    parser.add_argument("--out", required=True, help="Output folder (rerun the same command to resume).")
    parser.add_argument(
        "--real", action="store_true", help="--data holds real low-quality faces: no ground truth."
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def _add_verbose(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``--verbose`` on ``parser`` and every subcommand under it, so it goes before or after the
    subcommand (a subcommand's flag does not reset the top-level one)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="Show Ray's log lines and every worker's output on the terminal too (they always go to "
        "the run's log file, e.g. RUN_DIR/logs/rlrestore.log).",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbose(child)


def run_log(folder: str | Path) -> Path:
    """Log every record (Ray's and its workers' included) to ``folder/rlrestore.log``."""
    from rlrestore.runtime.console import LOG_FILE, log_to_file

    return log_to_file(Path(folder) / LOG_FILE)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    configure_console(args.verbose)
    if not args.verbose:  # one bar per phase: not Hugging Face's per-file "Loading weights" bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # argparse stops filling `overrides` at the first option: key=value items after options land here.
    trailing = all("=" in item and not item.startswith("-") for item in extra)
    if extra and trailing and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"rlrestore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "rlrestore: interrupted; rerun the same command to resume from the latest checkpoint",
            file=sys.stderr,
        )
        return 130
    finally:
        close_log_file()
