"""The ``rlrestore`` tool commands: ``plot``, ``config``, ``bench``, ``plan``, ``convert`` and
``serve-reward``, each a parser function and a command function (the training, restoration and
evaluation commands are in ``rlrestore.orchestration.cli``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlrestore.config import describe_schema, load_config


def default_config_path() -> Path:
    """The embedded tiny config (CPU, minutes) used by the demo and bench when no config is given."""
    return Path(__file__).parents[1] / "configs" / "tiny.yaml"


def add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    """The tool subcommands, in help order."""
    add_plot_parser(sub)
    add_config_parser(sub)
    add_bench_parser(sub)
    add_convert_parser(sub)
    add_plan_parser(sub)
    add_serve_reward_parser(sub)


def cmd_plot(args: argparse.Namespace) -> int:
    from rlrestore.orchestration.plotting import plot_run

    for path in plot_run(Path(args.run_dir), Path(args.out) if args.out else None):
        print(path)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "keys":
        print("\n".join(describe_schema()))
        return 0
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).model_dump(mode="json"), sort_keys=False))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rlrestore.orchestration.bench import REWARD_BENCH_DEFAULT, SIZES, format_report, run_bench
    from rlrestore.orchestration.cli import run_log  # the command module opens the log file

    # `rlrestore bench key=value` : the first override lands in the optional CONFIG slot.
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        config_path, overrides = None, [config_path, *overrides]
    config = load_config(config_path or default_config_path(), [*SIZES[args.size], *overrides])
    run_log(Path(args.out).resolve().parent)
    report = run_bench(
        config,
        args.out,
        repeats=args.repeats,
        parts=args.only or None,
        threads=args.threads,
        rewards=args.rewards.split(",") if args.rewards else REWARD_BENCH_DEFAULT,
        reward_images=args.reward_images,
        reward_size=args.reward_size,
    )
    print(format_report(report))
    print(f"report: {Path(args.out).resolve()}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from rlrestore.convert import convert

    report = convert(args.format, args.src, args.out, sana=args.sana, ta_tok=args.ta_tok)
    print(report.summary())
    print(f"policy directory: {Path(args.out).resolve()} (report: convert_report.json)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rlrestore.orchestration.plan import plan_from_args

    print(plan_from_args(
        args.config, args.overrides, gpus=args.gpus, gpu_memory=args.gpu_memory, tflops=args.tflops,
        bandwidth=args.bandwidth, efficiency=args.efficiency,
    ))
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    import json

    from rlrestore.config import RewardSpec
    from rlrestore.orchestration.serving import serve_reward, split_arguments

    reward_args, overrides = split_arguments(args.overrides)
    if args.host is not None:
        overrides.append(f"serve.host={json.dumps(args.host)}")
    if args.port is not None:
        overrides.append(f"serve.port={args.port}")
    config = load_config(args.config, overrides)
    serve_reward(config, RewardSpec(name=args.reward, args=reward_args), args.app, replace=args.replace)
    return 0


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    """``plot RUN_DIR``."""
    plot = sub.add_parser(
        "plot", help="Draw a run's metric curves (and Stage 2 rewards, Fig. 6 style) to PNG."
    )
    plot.add_argument("run_dir", help="Run directory.")
    plot.add_argument("--out", default=None, help="Output folder (default RUN_DIR/plots).")
    plot.set_defaults(func=cmd_plot)


def add_config_parser(sub: argparse._SubParsersAction) -> None:
    """``config {show,keys}``."""
    cfg = sub.add_parser("config", help="Show the resolved config or list every config key.")
    cfg.add_argument("action", choices=["show", "keys"], help="show: resolved YAML; keys: every key documented.")
    cfg.add_argument("config", nargs="?", default=None, help="YAML config file (show).")
    cfg.add_argument("overrides", nargs="*", help="key=value overrides.")
    cfg.set_defaults(func=cmd_config)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """``bench``: throughput ratios against plain baselines."""
    bench = sub.add_parser(
        "bench",
        help="Benchmark rollouts, the learner step, a Stage 2 step on Ray and reward throughput, each as a "
        "ratio against a plain baseline measured in the same run (random-init policy, tiny reward models, "
        "offline).",
    )
    bench.add_argument("config", nargs="?", default=None, help="YAML config (default: the embedded tiny config).")
    bench.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stage2.candidates=8.")
    bench.add_argument(
        "--out", default="bench.json", help="JSON file for the figures and their settings (default: ./bench.json)."
    )
    bench.add_argument("--repeats", type=int, default=3, help="Timed runs per figure after one warm-up (median).")
    bench.add_argument(
        "--size",
        choices=("tiny", "medium"),
        default="tiny",
        help="Model size: tiny (the config as given) or medium (a ~33M-parameter DiT at 128 px, where compute "
        "dominates); overrides given after it win.",
    )
    bench.add_argument(
        "--only", action="append", choices=["rollout", "learner", "stage2", "rewards"], default=[],
        help="Run only this benchmark (repeatable; default all).",
    )
    bench.add_argument(
        "--rewards", default=None,
        help="Comma-separated rewards of the 'rewards' benchmark (default: sharpness, psnr, ssim, piqe, "
        "hpsv2, pickscore, clipscore, clipscore_image, identity).",
    )
    bench.add_argument("--reward-images", type=int, default=32, help="Images each reward scores (default 32).")
    bench.add_argument("--reward-size", type=int, default=64, help="Side of those images in px (default 64).")
    bench.add_argument("--threads", type=int, default=1, help="Torch threads of this process (default 1).")
    bench.set_defaults(func=cmd_bench)


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """``plan``: memory, FLOPs, bytes and step time of every role, on the meta device."""
    plan = sub.add_parser(
        "plan",
        help="Estimate, for the config's full-size models, each role's GPU memory, FLOPs and bytes per step and "
        "the step time; flag what does not fit and the knob to turn (meta device: no weights, no GPU).",
    )
    plan.add_argument("config", help="YAML config, e.g. configs/prefrestore.yaml.")
    plan.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stage2.learner.zero_stage=1.")
    plan.add_argument("--gpus", type=int, default=None, help="GPUs available: does the config's request fit them?")
    plan.add_argument("--gpu-memory", default="80GiB", help="Memory of one GPU (default 80GiB).")
    plan.add_argument("--tflops", type=float, default=312.0,
                      help="Peak dense TFLOP/s of one GPU at the compute dtype (default 312, A100 bf16).")
    plan.add_argument("--efficiency", type=float, default=0.4,
                      help="Fraction of --tflops the roles achieve (default 0.4).")
    plan.add_argument("--bandwidth", default="12.5GB",
                      help="Bytes per second of a link between actors (default 12.5GB, 100 Gbit/s).")
    plan.set_defaults(func=cmd_plan)


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    from rlrestore.convert.formats import FORMATS

    convert = sub.add_parser(
        "convert",
        help="Convert a released checkpoint into an rlrestore policy directory (for restore, eval, "
        "policy.checkpoint). Never downloads; every source tensor is used or the command refuses, naming it.",
    )
    convert.add_argument(
        "format",
        choices=sorted(FORMATS),
        help="; ".join(f"{fmt.name}: {fmt.summary} ({fmt.repo})" for fmt in FORMATS.values()),
    )
    convert.add_argument(
        "src",
        nargs="?",
        default=None,
        help="The HF Trainer directory (config.json, model.safetensors.index.json + shards, tokenizer), or its "
        "Hugging Face id found in the local cache ($HF_HOME). Default: the format's released repo id.",
    )
    convert.add_argument("--out", required=True, help="New policy directory to write (must not exist or be empty).")
    convert.add_argument(
        "--sana",
        default=None,
        help="Base SANA diffusers folder or HF id (transformer/, vae/, scheduler/ configs; the clean DC-AE "
        "encoder when the checkpoint lacks fixed_vae). Default: config.json's diffusion_name_or_path.",
    )
    convert.add_argument(
        "--ta-tok",
        default=None,
        help="TA-Tok file ta_tok.pth (read with torch.load(weights_only=True)). Default: config.json's "
        "mm_vision_tower if present here, else csuhan/TA-Tok ta_tok.pth from the HF cache.",
    )
    convert.set_defaults(func=cmd_convert)


def add_serve_reward_parser(sub: argparse._SubParsersAction) -> None:
    """``serve-reward NAME [ARG=VALUE ...]``: a reward as a Ray Serve application."""
    serve = sub.add_parser(
        "serve-reward",
        help="Serve a reward as a Ray Serve application until Ctrl-C: an HTTP route in the http reward's wire "
        "format and a deployment handle the `serve` reward of Stage 2 runs on the same cluster calls.",
    )
    serve.add_argument("reward", help="Registered reward name, installed plugin name or package.module:Class.")
    serve.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="The reward's constructor args (KEY without dots, YAML values, e.g. version=v2.1) and config "
        "overrides (KEY starting with a config section or key: serve.replicas.num_gpus=1, serve.max_batch_size=16, "
        "ray.address=auto, device=cuda).",
    )
    serve.add_argument("--config", default=None, help="YAML config (its serve, ray, device, precision; default: defaults).")
    serve.add_argument("--app", default=None, help="Application name, also the route /APP (default: the reward's name).")
    serve.add_argument(
        "--host", default=None,
        help="Bind address of Serve's HTTP proxy (default serve.host, 127.0.0.1: this machine only; the route has "
        "no authentication).",
    )
    serve.add_argument("--port", type=int, default=None, help="Port of Serve's HTTP proxy (default serve.port, 8000).")
    serve.add_argument(
        "--replace", action="store_true", help="Replace an application of the same name already on the cluster."
    )
    serve.set_defaults(func=cmd_serve_reward)
