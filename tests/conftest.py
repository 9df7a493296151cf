"""Shared test fixtures: offline environment, the tiny config and policy, one Ray session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Nothing may reach for the network or the user's caches; set before any HF/torch import.
_CACHE = Path(tempfile.mkdtemp(prefix="rlrestore-test-cache-"))
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(_CACHE / "hf"),
        "TORCH_HOME": str(_CACHE / "torch"),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(_CACHE / "wandb"),
        "WANDB_CACHE_DIR": str(_CACHE / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(_CACHE / "wandb-config"),
        "WANDB_SILENT": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
)

import torch

from rlrestore.config import OptimConfig, RunConfig, load_config
from rlrestore.orchestration.cli_tools import default_config_path
from rlrestore.policies.prefrestore import PrefRestorePolicy

TINY_CONFIG = default_config_path()


def tiny_config(run_dir: Path | str, *overrides: str) -> RunConfig:
    """The embedded tiny config with progress bars off and the given overrides."""
    return load_config(TINY_CONFIG, [f"run_dir={run_dir}", "logging.progress=false", *overrides])


def build_tiny_policy(seed: int = 0, *overrides: str) -> PrefRestorePolicy:
    """A seeded random-init tiny policy (the same code path as a full-size one)."""
    torch.manual_seed(seed)
    return PrefRestorePolicy.from_config(tiny_config("unused", *overrides).policy).eval()


LEARNER_OPTIM = OptimConfig(lr=1e-3, weight_decay=1e-4, schedule="constant", warmup_ratio=0.0)


def make_learner(policy: PrefRestorePolicy, zero_stage: int = 0, learner_args: dict | None = None, **nft: object):
    """A single-rank NFT learner on ``policy``: beta 1, 2 timesteps per sample (``nft`` overrides),
    micro-batch 4, 8 sampler steps, a constant learning rate of 1e-3."""
    from rlrestore.config import NFTConfig
    from trainers.nft_learner import NFTLearner  # imported here: DeepSpeed loads only for tests that need it

    config = NFTConfig(**{"beta": 1.0, "timesteps_per_sample": 2, **nft})
    return NFTLearner(
        policy, config, LEARNER_OPTIM, micro_batch=4, zero_stage=zero_stage, sampler_steps=8, **(learner_args or {})
    )


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on 2 busy cores are ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_policy() -> PrefRestorePolicy:
    return build_tiny_policy()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray session for the whole test run (2 CPUs, no dashboard)."""
    import ray

    from rlrestore.orchestration.jobs import worker_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()}, log_to_driver=False)
    yield
    ray.shutdown()


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the bad-input campaign's table of cases and outcomes (tests/test_bad_inputs.py)."""
    from tests.campaign import OUTCOMES, table

    if OUTCOMES:
        terminalreporter.section(f"bad-input campaign: {len(OUTCOMES)} cases")
        terminalreporter.write_line(table())
