"""``rlrestore plan``: the table for the full-size configs, the learner's memory against a hand count,
FLOPs against measured CPU time, link bytes against real rollout outputs and weights, bad input."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rewards.pool import rows_of_range
from rlrestore.config import DegradationConfig, SamplerConfig
from rlrestore.data import build_shards, embedded_faces_dir
from rlrestore.orchestration.cli import main
from rlrestore.orchestration.plan import PlanOptions, make_plan, problems
from rlrestore.orchestration.plan_costs import conditions_per_rank, parse_bytes
from rlrestore.orchestration.plan_measure import flop_counter, measure_training
from rlrestore.orchestration.plan_roles import _learner_condition, build_meta_policy, learner_model
from rlrestore.runtime.dataplane import payload_bytes
from rollouts import RolloutWorker
from tests.conftest import build_tiny_policy, tiny_config
from trainers.nft_learner import NFTLearner
from trainers.nft_learner.samples import NFTSamples, StepSamples, split_samples

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROLES = ("stage1.1 worker", "stage1.2 worker", "rollout actor", "reward actor", "learner rank")


@pytest.mark.parametrize("name", ["prefrestore.yaml", "prefrestore_official.yaml"])
def test_plan_prints_the_table_for_the_full_size_configs(name: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(CONFIGS / name), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for role in ROLES:
        assert role in out, out
    for link in ("rollout -> reward", "rollout -> learner", "sync", "driver"):
        assert link in out
    assert "--gpus 8 covers it" in out and "per step" in out
    # The SANA 1.6B DiT is what the learner holds (1604.6 M, + LoRA adapters in the official config).
    learner = next(line for line in out.splitlines() if line.startswith("learner rank"))
    assert ("1604.6 M" in learner) == (name == "prefrestore.yaml")


# ------------------------------------------------------------------------------------ hand count
def _hand_count(module: nn.Module) -> int:
    """Parameters of the module's layers from their shapes and the layer formulas."""
    total, counted = 0, set()
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            n = layer.in_features * layer.out_features + (layer.out_features if layer.bias is not None else 0)
        elif isinstance(layer, nn.Conv2d):
            k = layer.kernel_size[0] * layer.kernel_size[1]
            n = layer.out_channels * layer.in_channels // layer.groups * k + (layer.out_channels if layer.bias is not None else 0)
        else:  # norms, embedding tables and the DiT's own tensors (e.g. scale_shift_table): their own params
            n = sum(p.numel() for p in layer.parameters(recurse=False))
        total += n
        counted.update(id(p) for p in layer.parameters(recurse=False))
    assert counted == {id(p) for p in module.parameters()}
    return total


def _lora_count(transformer: nn.Module, rank: int, targets: list[str]) -> int:
    """r x (in + out) per adapted Linear layer."""
    return sum(
        rank * (layer.in_features + layer.out_features)
        for name, layer in transformer.named_modules()
        if isinstance(layer, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


@pytest.mark.parametrize(
    ("precision", "zero", "finetune", "penalty"),
    [("fp32", 0, "full", 0.0), ("bf16-mixed", 1, "full", 0.0), ("bf16-mixed", 2, "lora", 1e-4), ("fp16-mixed", 2, "full", 1e-4)],
)
def test_learner_memory_matches_a_hand_count(tmp_path: Path, precision: str, zero: int, finetune: str, penalty: float) -> None:
    config = tiny_config(tmp_path, f"precision={precision}", f"stage2.learner.zero_stage={zero}",
                         f"stage2.learner.finetune={finetune}", f"stage2.nft.base_penalty={penalty}")
    velocity = build_tiny_policy().velocity_model
    dit, connector = _hand_count(velocity.transformer), _hand_count(velocity.vae_connector)
    learner = config.stage2.learner
    if finetune == "lora":
        trained = _lora_count(velocity.transformer, learner.lora_rank, learner.lora_targets)
        frozen = dit + connector
    else:
        trained, frozen = dit, connector
    ranks = config.stage2.resources.learner.num_actors
    w = 4 if precision == "fp32" else 2  # weights and gradients in the compute dtype
    adam = 8 + (0 if precision == "fp32" else 4)  # two fp32 moments (+ fp32 masters when mixed)
    expected = {
        "params": (trained + frozen) * w,
        "grads": trained * w // (ranks if zero >= 2 else 1),
        "optimizer": trained * adam // (ranks if zero >= 1 else 1),
        "copies": (trained + frozen) * 4 + ((trained + frozen) * w if penalty else 0),  # v_old fp32, v_base
    }
    row = next(r for r in make_plan(config, PlanOptions()).rows if r.role == "learner rank")
    got = {"params": row.state.params, "grads": row.state.grads, "optimizer": row.state.optimizer, "copies": row.copies}
    assert got == expected
    assert row.total == sum(expected.values()) + row.activations and row.activations > 0


def test_a_learner_that_does_not_fit_gets_knobs_and_the_micro_batch_that_fits(tmp_path: Path) -> None:
    overrides = ["stage2.resources.learner.num_gpus=1", "stage2.learner.zero_stage=1"]
    options = PlanOptions(gpus=1, gpu_memory=parse_bytes("4MiB"))
    found = problems(make_plan(tiny_config(tmp_path, *overrides), options))
    learner = next(p for p in found if p.startswith("learner rank"))
    for knob in ("stage2.learner.zero_stage=2", "stage2.learner.finetune=lora", "stage2.resources.learner.num_actors"):
        assert knob in learner
    assert any("stage2 asks for 2 GPUs, more than --gpus 1" in p for p in found)
    micro_batch = int(re.search(r"stage2\.learner\.micro_batch=(\d+)", learner).group(1))
    assert 1 <= micro_batch < 8
    refit = make_plan(tiny_config(tmp_path, *overrides, f"stage2.learner.micro_batch={micro_batch}"), options)
    assert not [p for p in problems(refit) if p.startswith("learner rank")]


# ------------------------------------------------------------------------------------ FLOPs vs time
def test_grouped_convolution_backward_counts_like_its_forward() -> None:
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    forward = 2 * 2 * 64 * 9 * 16 * 16  # 2 FLOPs per multiply-add, 9 taps per output of 2 x 64 x 16 x 16
    cost = measure_training(lambda: conv(x).sum(), [conv])
    assert cost.forward_flops == forward and cost.flops == 3 * forward


def test_meta_measurement_counts_what_the_flop_counter_counts(tmp_path: Path) -> None:
    """The plan's own FLOP meter and torch's FlopCounterMode (same grouped-conv fix) agree on a DiT
    forward/backward on the meta device, but for fused attention's recomputation."""
    config = tiny_config(tmp_path)
    model = learner_model(build_meta_policy(config), config)
    meta = build_meta_policy(config)
    field = meta.policy.velocity_model
    field.transformer.requires_grad_(True)
    m = config.stage2.learner.micro_batch
    condition = _learner_condition(meta, m)
    x, t = torch.empty(m, *meta.policy.latent_shape(), device="meta"), torch.empty(m, device="meta")
    with flop_counter() as counter:
        field(x, t, condition).float().square().mean().backward()
    # The plan runs attention as a fused (flash) kernel, whose backward recomputes the scores q k^T
    # once per attention call: the DiT's cross-attention, one per layer (its self-attention is linear).
    arch = config.policy.transformer.arch
    s_q = config.policy.resolution // 8 * (config.policy.resolution // 8)  # the f8 tiny DC-AE's latent
    s_k = meta.policy.num_semantic_tokens + 1 + s_q
    recompute = 2 * m * arch["num_cross_attention_heads"] * s_q * s_k * arch["cross_attention_head_dim"]
    assert model.train.flops == counter.get_total_flops() + arch["num_layers"] * recompute


def _matmul_flops_per_second() -> float:
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    runs = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(4):
            a @ b
        runs.append((time.perf_counter() - began) / 4)
    return 2 * 512**3 / sorted(runs)[len(runs) // 2]


def test_learner_flops_predict_its_cpu_time(tmp_path: Path) -> None:
    """The tiny learner's forward/backward for real on this CPU against its meta-device FLOPs at this
    machine's measured matmul rate. CPU efficiency on tiny layers varies: only a loose bound is asserted."""
    config = tiny_config(tmp_path, "stage2.learner.micro_batch=64")
    predicted_flops = learner_model(build_meta_policy(config), config).train.flops
    field = build_tiny_policy().velocity_model.train()
    field.transformer.requires_grad_(True)
    m = config.stage2.learner.micro_batch
    policy = build_tiny_policy()
    condition = policy.condition(torch.zeros(1, 3, 64, 64), [""], SamplerConfig(steps=1), torch.Generator().manual_seed(0))
    condition = condition.select(torch.zeros(m, dtype=torch.long))
    x, t = torch.randn(m, *policy.latent_shape()), torch.rand(m)
    with flop_counter() as counter:
        field(x, t, condition).square().mean().backward()
    runs = []
    for _ in range(5):
        began = time.perf_counter()
        field(x, t, condition).square().mean().backward()
        runs.append(time.perf_counter() - began)
    measured, rate = sorted(runs)[2], _matmul_flops_per_second()
    predicted = predicted_flops / rate
    ratio = measured / predicted
    print(f"\nlearner micro-batch {m}: {predicted_flops / 1e9:.3f} GFLOP (real-run counter "
          f"{counter.get_total_flops() / 1e9:.3f}); matmul rate {rate / 1e9:.1f} GFLOP/s; predicted "
          f"{predicted * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms: measured / predicted = {ratio:.2f}")
    # On the CPU torch runs attention as a fused kernel the counter does not know; on meta it counts
    # attention's matmuls too, so the meta count holds the real run's counted work and more.
    assert counter.get_total_flops() <= predicted_flops
    assert 1 / 20 < ratio < 20


# ------------------------------------------------------------------------------------ bytes
@pytest.fixture(scope="module")
def rollout_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("plan")
    build_tiny_policy(0).save_pretrained(root / "policy")
    build_shards(embedded_faces_dir(), root / "shards", image_size=64, shard_size=32, progress=False)
    return {
        "policy_dir": str(root / "policy"), "shards": str(root / "shards"),
        "degradation": DegradationConfig().model_dump(mode="json"), "data_seed": 3, "holdout": 4,
    }


def test_link_bytes_match_real_rollout_parts_and_weight_updates(tmp_path: Path, rollout_setup: dict) -> None:
    """link_bytes against the data plane's own objects: the rollout parts a tiny RolloutWorker
    leaves (sized by payload_bytes, as rollout/bytes logs them), fetched as the reward pool and the
    learner ranks fetch them, and the WeightUpdate a learner sends (sync/bytes)."""
    inputs, k, call, ranks, reward_actors = 5, 3, 2, 3, 2
    config = tiny_config(tmp_path, f"stage2.inputs_per_step={inputs}", f"stage2.candidates={k}",
                         f"stage2.rollout.batch_size={call}", f"stage2.resources.learner.num_actors={ranks}",
                         f"stage2.resources.reward.num_actors={reward_actors}")
    links = make_plan(config, PlanOptions()).links
    worker = RolloutWorker(**rollout_setup)
    calls = [list(range(start, min(start + call, inputs))) for start in range(0, inputs, call)]
    parts = [worker.rollout_parts(c, 0, torch.arange(len(c) * k).reshape(len(c), k), SamplerConfig(steps=2)) for c in calls]
    sizes = [meta.inputs * meta.candidates for meta, _, _ in parts]
    bounds = np.linspace(0, sum(sizes), reward_actors + 1).astype(int).tolist()
    to_reward = sum(
        parts[i][0].nbytes["reward"] for low, high in itertools.pairwise(bounds) for i in rows_of_range(sizes, low, high)[0]
    )
    assert links.rollout_to_reward == to_reward
    step = StepSamples([learner for _, _, learner in parts], sizes, torch.full((sum(sizes),), 0.5),
                       torch.ones(sum(sizes), dtype=torch.bool))
    assert links.rollout_to_learner == sum(payload_bytes(part) for share in step.shares(ranks) for part in share.parts)
    # sync: the update a learner rank builds for the rollout actors (full fine-tuning: the trained DiT)
    update = NFTLearner(build_tiny_policy(), config.stage2.nft, config.stage2.optim).rollout_update()
    assert links.sync_put == update.nbytes
    assert links.sync_pull == config.stage2.resources.rollout.num_actors * update.nbytes


def test_lora_sync_bytes_are_the_adapters(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "stage2.learner.finetune=lora", "stage2.learner.lora_rank=4", "precision=bf16-mixed")
    links = make_plan(config, PlanOptions()).links
    learner = config.stage2.learner
    update = NFTLearner(
        build_tiny_policy(), config.stage2.nft, config.stage2.optim, finetune="lora", lora_rank=4,
        lora_alpha=learner.lora_alpha, lora_targets=tuple(learner.lora_targets), precision="bf16-mixed",
    ).rollout_update()
    assert update.kind == "lora" and links.sync_put == update.nbytes


@pytest.mark.parametrize(("inputs", "k", "ranks"), [(3, 5, 2), (4, 4, 3), (48, 24, 4), (2, 3, 7)])
def test_conditions_per_rank_follow_the_real_split(inputs: int, k: int, ranks: int) -> None:
    samples = NFTSamples(
        x0=torch.zeros(inputs * k, 1, 1, 1), group=torch.arange(inputs).repeat_interleave(k),
        condition=_codes_condition(inputs),
        r=torch.zeros(inputs * k), valid=torch.ones(inputs * k, dtype=torch.bool),
    )
    assert conditions_per_rank(inputs, k, ranks) == [len(s.condition) for s in split_samples(samples, ranks)]


def _codes_condition(inputs: int):
    from rlrestore.policies.prefrestore.velocity import PrefRestoreCondition

    return PrefRestoreCondition(
        semantic=torch.zeros(inputs, 1, 1), z_low=torch.zeros(inputs, 1, 1, 1), codes=torch.zeros(inputs, 1, dtype=torch.long)
    )


# ------------------------------------------------------------------------------------ bad input
def test_parse_bytes() -> None:
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("12.5GB/s") == 12_500_000_000
    assert parse_bytes("1e9") == 10**9
    for bad in ("80 gigs", "", "-1GB", "0"):
        with pytest.raises(ValueError, match="--gpu-memory"):
            parse_bytes(bad, "--gpu-memory")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["plan", "no/such/config.yaml"], "no/such/config.yaml"),
        (["plan", str(CONFIGS / "tiny.yaml"), "--gpu-memory", "80 gigs"], "'80 gigs'"),
        (["plan", str(CONFIGS / "tiny.yaml"), "--bandwidth", "fast"], "'fast'"),
        (["plan", str(CONFIGS / "tiny.yaml"), "--gpus", "0"], "--gpus 0"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], named: str, capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    assert named in capsys.readouterr().err
