"""The policy interface carries a second model: a small conditional UNet flow written only against it
(``rlrestore/policies/flow_unet.py``) restores, saves and loads, trains on an NFT learner rank, and
goes through Stage 1 and Stage 2 on Ray; the learner and the rollout worker name nothing of
Pref-Restore."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlrestore.config import NFTConfig, OptimConfig, SamplerConfig, load_config
from rlrestore.policies import build_policy, load_policy, load_velocity_model
from rlrestore.policies.flow_unet import FlowUNetCondition, FlowUNetPolicy
from trainers.nft_learner import NFTLearner, NFTSamples

REPO = Path(__file__).resolve().parents[1]
FLOW_UNET = REPO / "configs" / "flow_unet_tiny.yaml"
SAMPLER = SamplerConfig(steps=3)


@pytest.fixture(scope="module")
def policy() -> FlowUNetPolicy:
    torch.manual_seed(0)
    return build_policy(load_config(FLOW_UNET).policy).eval()


def degraded(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_unet_flow_restores_from_its_own_start_and_round_trips(policy: FlowUNetPolicy, tmp_path: Path) -> None:
    lq = degraded(2)
    seeds = torch.tensor([[1, 2], [3, 4]])
    out = policy.restore(lq, ["", ""], seeds, SAMPLER)
    assert out.latents.shape == out.images.shape == (2, 2, 3, 32, 32)
    assert isinstance(out.condition, FlowUNetCondition) and torch.equal(out.condition.lq, lq)
    assert not torch.allclose(out.images[0, 0], out.images[0, 1])  # candidates differ by their noise
    # sampling starts at the path's endpoint y + source_noise * eps, not at pure noise
    noise = torch.randn(1, 3, 32, 32)
    model = policy.velocity_model
    start = model.start(FlowUNetCondition(lq[:1]), noise)
    torch.testing.assert_close(start, lq[:1] + 0.5 * noise)

    policy.save_pretrained(tmp_path / "policy")
    loaded = load_policy(tmp_path / "policy")
    assert isinstance(loaded, FlowUNetPolicy)
    assert torch.equal(loaded.restore(lq, ["", ""], seeds, SAMPLER).latents, out.latents)
    velocity = load_velocity_model(tmp_path / "policy")
    assert velocity.state_dict().keys() == policy.velocity_model.state_dict().keys()


def test_an_nft_learner_trains_the_unet_flow_towards_its_own_endpoint(policy: FlowUNetPolicy) -> None:
    """r = 1 pulls v_theta towards endpoint - x0, the target of the policy's own path."""
    n = 4
    lq, x0 = degraded(n, 1), degraded(n, 2)
    samples = NFTSamples(
        x0=x0, group=torch.arange(n), condition=FlowUNetCondition(lq), r=torch.ones(n), valid=torch.ones(n, dtype=bool)
    )
    learner = NFTLearner(
        policy, NFTConfig(beta=1.0, timesteps_per_sample=2), OptimConfig(lr=3e-3, schedule="constant", warmup_ratio=0.0),
        micro_batch=4, zero_stage=0, sampler_steps=4,
    )  # fmt: skip

    @torch.no_grad()
    def error() -> float:
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
        endpoint = lq + 0.5 * noise
        t = torch.full((n,), 0.5)
        v = learner.engine.module(0.5 * x0 + 0.5 * endpoint, t, FlowUNetCondition(lq))
        return float((v - (endpoint - x0)).square().mean())

    before = error()
    for step in range(5):
        learner.train_step(samples, step)
    assert error() < 0.9 * before
    assert learner.state_dict_for_rollout().keys() == policy.velocity_model.state_dict().keys()
    with pytest.raises(ValueError, match="group indices"):
        replace(samples, group=torch.tensor([0, 1, 2, 7]))


def test_the_learner_and_the_rollout_worker_name_nothing_of_pref_restore() -> None:
    """They reach a model only through ``rlrestore.policies``: no Pref-Restore module, class or part."""
    files = [REPO / "rollouts" / "worker.py", *sorted((REPO / "trainers" / "nft_learner").glob("*.py"))]
    specific = {"transformer", "vae_connector", "z_low", "semantic", "integrator", "PrefRestorePolicy"}
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "prefrestore" not in (node.module or ""), f"{path.name} imports {node.module}"
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            assert name not in specific, f"{path.name}:{node.lineno} names {name}"


@pytest.mark.slow
def test_stage1_then_stage2_train_the_unet_flow(tmp_path: Path, ray_cluster, capsys) -> None:
    from rlrestore.checkpoints import latest_checkpoint
    from rlrestore.orchestration.cli import main
    from rlrestore.tracking import read_metrics

    keys = [
        f"run_dir={tmp_path / 'run'}", "logging.progress=false", "logging.wandb_mode=disabled",
        "stage1_2.steps=6", "stage1_2.checkpoint_every=6", "stage2.steps=3", "stage2.outputs.checkpoint_every=3",
        "stage2.outputs.sample_grid_every=3",
    ]  # fmt: skip
    assert main(["train", "stage1", str(FLOW_UNET), *keys]) == 0  # the policy's Stage 1 is stage1.2 only
    assert latest_checkpoint(tmp_path / "run", "stage1.1") is None
    stage1 = read_metrics(tmp_path / "run", "stage1.2")
    assert stage1["step"].tolist() == list(range(6)) and stage1["loss"].notna().all()
    assert main(["train", "stage2", str(FLOW_UNET), *keys]) == 0
    stage2 = read_metrics(tmp_path / "run", "stage2")
    assert stage2["step"].tolist() == [0, 1, 2] and stage2["learn/loss"].notna().all()

    start = load_policy(latest_checkpoint(tmp_path / "run", "stage1.2") / "policy")
    final = load_policy(latest_checkpoint(tmp_path / "run", "stage2") / "policy")
    assert isinstance(final, FlowUNetPolicy)
    changed = [k for k, v in final.unet.state_dict().items() if not torch.equal(v, start.unet.state_dict()[k])]
    assert changed  # Stage 2 moved the UNet
    out = tmp_path / "restored"
    face = min((REPO / "rlrestore" / "assets" / "faces").glob("*.png"))
    assert main(["restore", "--ckpt", str(tmp_path / "run"), "--out", str(out), str(face), "--quiet"]) == 0
    assert (out / f"{face.stem}.png").is_file()
    assert main(["train", "stage1.1", str(FLOW_UNET), *keys]) == 2  # a Pref-Restore stage
    assert "the flow_unet policy (policy.type) trains in the Stage 1 stages ['stage1.2']" in capsys.readouterr().err
