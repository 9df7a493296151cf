"""The Stage 2 data plane: what passes through the driver, what a weight sync sends, and the typed
parts of a rollout call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rewards.pool import candidate_labels, rows_of_range
from rewards.worker import CandidateRows
from rlrestore.checkpoints import save_checkpoint
from rlrestore.models.lora import add_lora
from rlrestore.orchestration.jobs import prepare_shards
from rlrestore.orchestration.plan import PlanOptions, make_plan
from rlrestore.orchestration.stage2 import Stage2Run
from rlrestore.policies.prefrestore import PrefRestorePolicy
from rlrestore.runtime.dataplane import (
    RolloutMeta,
    WeightUpdate,
    from_uint8_images,
    load_weight_update,
    payload_bytes,
    save_weight_update,
    to_uint8_images,
)
from tests.conftest import tiny_config

STEP = (
    "stage2.inputs_per_step=2",
    "stage2.candidates=3",
    "stage2.rollout.batch_size=1",
    "stage2.rollout.sampler_steps=2",
    "stage2.resources.learner.num_actors=1",
    "stage2.resources.rollout.num_actors=1",
    "stage2.learner.zero_stage=0",
    "stage2.learner.lora_rank=2",
)


def test_uint8_images_round_trip_within_half_a_level() -> None:
    images = torch.rand(2, 3, 3, 8, 8) * 2.4 - 1.2  # some values outside [-1, 1] are clamped
    packed = to_uint8_images(images)
    assert packed.dtype == torch.uint8 and packed.shape == images.shape
    assert (from_uint8_images(packed) - images.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="uint8"):
        from_uint8_images(images)


def test_payload_bytes_counts_data_not_containers() -> None:
    meta = RolloutMeta(["a", "bc"], ["", "x"], torch.zeros(2, 3, dtype=torch.long), 4)
    # ids 3 bytes, captions 1, seeds 48, version 8, cached 8, nbytes {} 0
    assert payload_bytes(meta) == 3 + 1 + 48 + 8 + 8
    assert payload_bytes({"k": torch.zeros(4, dtype=torch.float16)}) == 1 + 8
    with pytest.raises(TypeError, match="cannot size"):
        payload_bytes(object())


def test_candidate_rows_map_a_range_of_the_step_onto_its_calls() -> None:
    used, rows = rows_of_range([6, 3, 6], 4, 11)
    assert used == [0, 1, 2]
    assert rows == [CandidateRows(0, 4, 6), CandidateRows(1, 0, 3), CandidateRows(2, 0, 2)]
    assert rows_of_range([6, 3], 6, 9) == ([1], [CandidateRows(0, 0, 3)])
    metas = [
        RolloutMeta(["a", "b"], ["cap a", ""], torch.zeros(2, 2, dtype=torch.long), 0),
        RolloutMeta(["c"], ["cap c"], torch.zeros(1, 2, dtype=torch.long), 0),
    ]
    captions, metadata = candidate_labels(metas)
    assert captions == ["cap a", "cap a", "", "", "cap c", "cap c"]
    assert [entry["input"] for entry in metadata] == [0, 0, 1, 1, 2, 2]
    assert metadata[4]["id"] == "c"


def test_weight_updates_keep_their_kind_and_read_older_files(tmp_path: Path) -> None:
    update = WeightUpdate("lora", {"a.lora_A.default.weight": torch.ones(2, 3)}, {"rank": 2, "alpha": 4.0})
    save_weight_update(update, tmp_path / "update.safetensors")
    again = load_weight_update(tmp_path / "update.safetensors")
    assert again.kind == "lora" and again.lora == {"rank": 2, "alpha": 4.0}
    assert torch.equal(again.tensors["a.lora_A.default.weight"], torch.ones(2, 3)) and again.nbytes == 24
    save_file({"w": torch.zeros(2)}, str(tmp_path / "old.safetensors"))  # an earlier release: whole weights
    assert load_weight_update(tmp_path / "old.safetensors").kind == "full"


def one_step(tmp_path: Path, name: str, *overrides: str) -> dict[str, float]:
    """Metrics of Stage 2 step 0 of a random-init tiny policy on the test's Ray session, with the
    bytes ``rlrestore plan`` predicts for the same config (``plan/<link>``)."""
    config = tiny_config(tmp_path / name, *STEP, *overrides)
    links = make_plan(config, PlanOptions()).links
    torch.manual_seed(0)
    policy = PrefRestorePolicy.from_config(config.policy).eval()
    save_checkpoint(config.run_dir, "stage1.2", 1, policy, {"step": 1}, keep=1)
    prepare_shards(config)
    run = Stage2Run(config)
    try:
        metrics = run.run_step(0, run.rollouts.launch(0)).metrics()
    finally:
        run.shutdown()
    return {**metrics, "plan/sync": links.sync_put, "plan/driver_in": links.driver_in}


def trained_bytes(finetune: str) -> int:
    """Float32 bytes of what a tiny Stage 2 run trains: the DiT's LoRA factors or all its weights."""
    velocity = PrefRestorePolicy.from_config(tiny_config("unused").policy).velocity_model
    if finetune == "lora":
        for module in velocity.stage2_modules():
            add_lora(module, 2, 32.0, ("to_q", "to_k", "to_v", "to_out.0"))
        params = [p for name, p in velocity.named_parameters() if ".lora_" in name]
    else:
        params = [p for module in velocity.stage2_modules() for p in module.parameters()]
    return 4 * sum(param.numel() for param in params)


@pytest.mark.slow
def test_the_driver_moves_kilobytes_whatever_the_resolution_and_lora_syncs_adapters(
    tmp_path: Path, ray_cluster
) -> None:
    small = one_step(tmp_path, "px64")
    large = one_step(tmp_path, "px128", "policy.resolution=128", "policy.transformer.arch.sample_size=16")
    lora = one_step(tmp_path, "lora", "stage2.learner.finetune=lora")
    for metrics in (small, large, lora):
        assert 0 < metrics["driver/bytes_in"] and 0 < metrics["driver/bytes_out"]
        assert metrics["rollout/bytes"] >= 100 * metrics["driver/bytes_in"], metrics
    # 4x the pixels and latents: the rollouts produce about 4x the bytes, the driver reads the same
    assert large["rollout/bytes"] > 3.5 * small["rollout/bytes"]
    assert large["driver/bytes_in"] == pytest.approx(small["driver/bytes_in"], rel=0.05)
    assert large["driver/bytes_out"] == pytest.approx(small["driver/bytes_out"], rel=0.05)
    # a sync sends what trains: all DiT weights (full fine-tuning), or only the LoRA factors
    assert small["sync/bytes"] == trained_bytes("full")
    assert lora["sync/bytes"] == trained_bytes("lora") < trained_bytes("full") / 10
    assert lora["sync/seconds"] > 0
    # the planner's bytes against the counters: sync exactly; the driver's inbound bytes (scores,
    # ids, metadata, metrics) within a factor of 5, printed for the record
    for metrics in (small, large, lora):
        assert metrics["plan/sync"] == metrics["sync/bytes"]
        ratio = metrics["driver/bytes_in"] / metrics["plan/driver_in"]
        print(
            f"driver bytes in: measured {metrics['driver/bytes_in']:.0f}, planned {metrics['plan/driver_in']}, ratio {ratio:.2f}"
        )
        assert 0.2 < ratio < 5, ratio
