"""Stage 1 mixed precision on the CPU (bf16 / fp16 autocast works there): float32 master weights
move at lr 1e-5 where AdamW on bf16 weights would not, bf16 and fp32 losses agree, and fp16
loss scaling skips an overflowed step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlrestore.config import RunConfig
from rlrestore.precision import Precision
from tests.conftest import build_tiny_policy, tiny_config
from tests.test_losses import _batch
from trainers.stage1 import Stage1Objective, optimizer_step

CPU = torch.device("cpu")
LR = 1e-5  # Pref-Restore's Stage 1 learning rate (Table I)


@pytest.fixture(scope="module")
def config() -> RunConfig:
    return tiny_config("unused", "stage1_1.condition_dropout=0")


def _setup(config: RunConfig) -> tuple[Stage1Objective, list[nn.Parameter], torch.optim.Optimizer]:
    policy = build_tiny_policy(0)
    stage = config.stage1_1
    params = policy.set_trainable(list(stage.trainable))
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    return Stage1Objective(policy, "stage1.1", stage), params, optimizer


def _step(objective, params, optimizer, precision: str, scaler=None) -> tuple[dict, bool]:
    losses, _, skipped = optimizer_step(
        objective, _batch(), torch.Generator().manual_seed(0), params, optimizer, Precision(precision), CPU, 1.0, scaler
    )
    return losses, skipped


def _changed_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    changed = sum(int((a != b).sum()) for a, b in zip(before, after, strict=True))
    return changed / sum(a.numel() for a in before)


def test_bf16_mixed_step_at_lr_1e5_moves_the_float32_masters(config: RunConfig) -> None:
    objective, params, optimizer = _setup(config)
    before = [p.detach().clone() for p in params]
    _step(objective, params, optimizer, "bf16-mixed")
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.grad.dtype for p in params} == {torch.float32}
    assert _changed_fraction(before, [p.detach() for p in params]) > 0.99


def test_adamw_on_bf16_weights_drops_the_update(config: RunConfig) -> None:
    """The old behaviour (policy.dtype=bfloat16: AdamW stepping bf16 weights) with the same
    gradients: at lr 1e-5 the update is below bf16's spacing for all but near-zero weights."""
    objective, params, optimizer = _setup(config)
    _step(objective, params, optimizer, "bf16-mixed")  # gradients of the mixed step
    bf16 = [nn.Parameter(p.detach().to(torch.bfloat16)) for p in params]
    for weight, param in zip(bf16, params, strict=True):
        weight.grad = param.grad.to(torch.bfloat16)
    before = [w.detach().clone() for w in bf16]
    torch.optim.AdamW(bf16, lr=LR, weight_decay=0.0).step()
    assert _changed_fraction(before, [w.detach() for w in bf16]) < 0.25


def test_bf16_mixed_and_fp32_losses_agree(config: RunConfig) -> None:
    fp32, _ = _step(*_setup(config), "fp32")
    bf16, _ = _step(*_setup(config), "bf16-mixed")
    assert set(fp32) == set(bf16)
    for key in ("loss", "diff_loss", "ce_loss"):
        assert bf16[key].dtype == torch.float32
        assert bf16[key].item() == pytest.approx(fp32[key].item(), rel=1e-2), key
    assert bf16["loss"].item() != fp32["loss"].item()  # autocast did run in bf16


def test_fp16_mixed_skips_an_overflowed_step(config: RunConfig) -> None:
    objective, params, optimizer = _setup(config)
    before = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # scaled fp16 gradients overflow
    _, skipped = _step(objective, params, optimizer, "fp16-mixed", scaler)
    assert skipped and scaler.get_scale() == 2.0**39
    assert _changed_fraction(before, [p.detach() for p in params]) == 0.0
    assert Precision("fp16-mixed").grad_scaler(CPU) is not None and Precision("bf16-mixed").grad_scaler(CPU) is None
