"""Rewards served by Ray Serve on the test session's Ray cluster: the HTTP route in the ``http``
reward's wire format, dynamic batching, the ``serve`` reward by handle and its errors, the
``rlrestore serve-reward`` command, and a tiny Stage 2 run trained on a served reward."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import torch
from ray import serve

from rewards import RewardBatch, RewardError, build_reward
from rewards.serving import ScoreRequest
from rlrestore.config import ConfigError, RewardSpec, load_config
from rlrestore.data import to_tensor, to_uint8
from rlrestore.orchestration import serving
from rlrestore.orchestration.cli import main
from rlrestore.orchestration.serving import ServedReward, deploy_reward, split_arguments

APP = "sharpness-test"
WAIT_S = 0.5  # the batch wait of the module's application: long enough to gather concurrent requests


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(count: int, clean: torch.Tensor | None = None) -> RewardBatch:
    return RewardBatch([f"face {i}" for i in range(count)], clean=clean, metadata=[{"id": i} for i in range(count)])


def _sharpness(images: torch.Tensor) -> torch.Tensor:
    return build_reward(RewardSpec(name="sharpness"))(images, _batch(images.shape[0]))


@pytest.fixture(scope="module")
def served(ray_cluster) -> Iterator[ServedReward]:
    """The sharpness reward as application APP (one 0.25-CPU replica, HTTP proxy on 127.0.0.1)."""
    overrides = ["serve.replicas.num_cpus=0.25", f"serve.port={_free_port()}", "serve.max_batch_size=8",
                 f"serve.batch_wait_timeout_s={WAIT_S}"]  # fmt: skip
    try:
        yield deploy_reward(load_config(None, overrides), RewardSpec(name="sharpness"), APP)
    finally:
        serve.shutdown()


def _stats(served: ServedReward) -> dict[str, int]:
    return served.handle.stats.remote().result(timeout_s=30)


def test_the_route_answers_the_wire_format_with_the_rewards_scores(served: ServedReward) -> None:
    assert served.route.startswith("http://127.0.0.1:") and served.route.endswith(f"/{APP}")
    images = _images(4)
    direct = _sharpness(images)
    exact = build_reward(RewardSpec(name="http", args={"url": served.route, "encoding": "npy"}))
    torch.testing.assert_close(exact(images, _batch(4)), direct, rtol=0, atol=0)
    png = build_reward(RewardSpec(name="http", args={"url": served.route}))(images, _batch(4))
    torch.testing.assert_close(png, _sharpness(_png_round_trip(images)), rtol=0, atol=0)

    bad = requests.post(served.route, data=b'{"encoding": "npy", "count": 1}', timeout=30)
    assert bad.status_code == 400 and "it lacks ['captions', 'images']" in bad.json()["error"]
    wrong_method = requests.get(served.route, timeout=30)
    assert wrong_method.status_code == 405 and "POST a scoring request" in wrong_method.json()["error"]


def _png_round_trip(images: torch.Tensor) -> torch.Tensor:
    """What PNGs of the images carry back, as [-1, 1] float."""
    return torch.stack([to_tensor(to_uint8(image)) for image in images])


def test_concurrent_requests_are_scored_in_fewer_reward_calls(served: ServedReward) -> None:
    before = _stats(served)
    # Four requests of 16 px and four of 24 px, sent at once: one batch, one reward call per size.
    inputs = [_images(2 + i % 3, size=16 if i < 4 else 24, seed=i) for i in range(8)]
    responses = [served.handle.score.remote(ScoreRequest.of(x, _batch(x.shape[0]))) for x in inputs]
    answers = [response.result(timeout_s=60) for response in responses]
    after = _stats(served)
    for x, answer in zip(inputs, answers, strict=True):
        torch.testing.assert_close(torch.from_numpy(np.array(answer)), _sharpness(x), rtol=0, atol=0)
    calls, batches = after["reward_calls"] - before["reward_calls"], after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == 8
    assert after["images"] - before["images"] == sum(x.shape[0] for x in inputs)
    assert batches <= 2 and calls <= 4, f"8 concurrent requests took {batches} batches and {calls} reward calls"


def test_the_serve_reward_calls_the_deployment_by_handle(served: ServedReward) -> None:
    images, clean = _images(5, seed=7), _images(5, seed=8)
    reward = build_reward(RewardSpec(name="serve", args={"app": APP, "timeout_s": 30}))
    assert reward.name == "serve"
    torch.testing.assert_close(reward(images, _batch(5, clean)), _sharpness(images), rtol=0, atol=0)
    assert served.handle.info.remote().result(timeout_s=30)["reward"] == "sharpness"


def test_serve_reward_errors_name_the_application(served: ServedReward) -> None:
    images = _images(4)
    missing = build_reward(RewardSpec(name="serve", args={"app": "no-such-app"}))
    with pytest.raises(RewardError, match=r"Serve application 'no-such-app' is not running on this Ray cluster"):
        missing(images, _batch(4))
    impatient = build_reward(RewardSpec(name="serve", args={"app": APP, "timeout_s": WAIT_S / 10}))
    with pytest.raises(RewardError, match=rf"Serve application '{APP}' did not answer within timeout_s=0.05 s"):
        impatient(images, _batch(4))  # the batch waits WAIT_S for company

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    class Liar:
        """Answers one score too many, or fails when the first caption says so."""

        def score(self, request: ScoreRequest) -> np.ndarray:
            if request.captions[0] == "boom":
                raise RuntimeError("model weights corrupt")
            return np.zeros(len(request.captions) + 1, np.float32)

    serve.run(Liar.bind(), name="liar", route_prefix=None)
    liar = build_reward(RewardSpec(name="serve", args={"app": "liar"}))
    with pytest.raises(RewardError, match=r"Serve application 'liar' answered scores of shape \(5,\) for 4 images"):
        liar(images, _batch(4))
    with pytest.raises(RewardError, match=r"Serve application 'liar' failed: RuntimeError: model weights corrupt"):
        liar(images, RewardBatch(["boom", "", "", ""]))
    serve.delete("liar")
    with pytest.raises(RewardError, match="application name 'a b' must be letters"):
        build_reward(RewardSpec(name="serve", args={"app": "a b"}))


def test_the_command_serves_until_interrupted(served: ServedReward, monkeypatch, capsys) -> None:
    port = int(served.route.rsplit(":", 1)[1].split("/", 1)[0])
    route = f"http://127.0.0.1:{port}/brightness"
    images = _images(3)
    answered = []

    def request_then_interrupt() -> None:  # stands in for the user pressing Ctrl-C
        assert serve.status().applications["brightness"].status == "RUNNING"
        http = build_reward(RewardSpec(name="http", args={"url": route, "encoding": "npy"}))
        answered.append(http(images, _batch(3)))
        raise KeyboardInterrupt

    monkeypatch.setattr(serving, "wait_for_interrupt", request_then_interrupt)
    command = ["serve-reward", "tests.fault_rewards:Sleeping", "seconds=0", "--app", "brightness",
               "--port", str(port), "serve.replicas.num_cpus=0.05", "serve.batch_wait_timeout_s=0"]  # fmt: skip
    assert main(command) == 0
    torch.testing.assert_close(answered[0], images.mean(dim=(1, 2, 3)))  # Sleeping(seconds=0) scores brightness
    out = capsys.readouterr().out
    assert "application: brightness\n" in out and f"route: {route} (POST" in out
    assert "brightness" not in serve.status().applications  # deleted on the way out

    assert main(["serve-reward", "sharpness", "--app", APP, "--port", str(port)]) == 2
    assert f"Serve application '{APP}' already runs on this Ray cluster" in capsys.readouterr().err
    other = port + 1 if port < 65535 else port - 1
    assert main(["serve-reward", "sharpness", "--app", "elsewhere", "--port", str(other)]) == 2
    assert f"with its HTTP proxy on 127.0.0.1:{port}, not 127.0.0.1:{other}" in capsys.readouterr().err


def test_arguments_split_into_reward_args_and_config_overrides() -> None:
    args, overrides = split_arguments(["version=v2.1", "serve.max_batch_size=16", "device=cpu", "scale=0.5"])
    assert args == {"version": "v2.1", "scale": 0.5}
    assert overrides == ["serve.max_batch_size=16", "device=cpu"]
    with pytest.raises(ConfigError, match="'model' is no config section"):
        split_arguments(["model.path=/w"])
    with pytest.raises(ConfigError, match="serve.max_ongoing_requests=4 is below serve.max_batch_size=8"):
        load_config(None, ["serve.max_ongoing_requests=4"])
    assert load_config(None).serve.host == "127.0.0.1"


@pytest.mark.slow
def test_a_tiny_stage2_run_trains_on_a_served_reward(served: ServedReward, tmp_path) -> None:
    from rlrestore.checkpoints import save_checkpoint
    from rlrestore.orchestration.stage2 import run_stage2
    from rlrestore.tracking import read_metrics
    from tests.conftest import build_tiny_policy, tiny_config
    from tests.test_stage2_ray import STAGE2

    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, "stage1.2", 1, build_tiny_policy(), {"step": 1}, keep=1)
    rewards = [{"name": "serve", "args": {"app": APP, "timeout_s": 60}}, {"name": "sharpness", "weight": 0.0}]
    config = tiny_config(
        run_dir, *STAGE2, "stage2.steps=2", "stage2.resources.learner.num_actors=1", "stage2.learner.zero_stage=0",
        "stage2.resources.rollout.num_actors=1", "stage2.outputs.checkpoint_every=2",
        "stage2.outputs.sample_grid_every=100", f"stage2.rewards={json.dumps(rewards)}", "logging.wandb_mode=disabled",
    )  # fmt: skip
    before = _stats(served)
    run_stage2(config)

    frame = read_metrics(run_dir, "stage2").set_index("step")
    assert frame.index.tolist() == [0, 1]
    assert frame["reward/errors/serve"].tolist() == [0.0, 0.0]
    served_mean, local_mean = frame["reward/serve/mean"], frame["reward/sharpness/mean"]
    assert all(math.isfinite(value) and value > 0 for value in served_mean)
    np.testing.assert_allclose(served_mean, local_mean, rtol=1e-6)  # the deployment scored what the actor did
    assert all(math.isfinite(value) for value in frame["learn/loss"])
    assert _stats(served)["requests"] - before["requests"] >= 2  # at least one call per step reached it
