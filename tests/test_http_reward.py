"""The HTTP reward against a test scorer on 127.0.0.1 (ephemeral port, in a thread): round
trips in both encodings, retries on timeouts and server errors, clear errors for bad answers."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rewards import Reward, RewardBatch, RewardError, build_reward
from rewards.http import decode_request, encode_images
from rewards.quality import mean_gradient_magnitude
from rlrestore.config import RewardSpec
from rlrestore.data import to_tensor, to_uint8
from tests.scorer_server import ScorerServer

COUNT = 4


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(COUNT, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(clean: torch.Tensor | None = None) -> RewardBatch:
    return RewardBatch(
        [f"face {i}" for i in range(COUNT)], clean=clean, metadata=[{"id": i} for i in range(COUNT)]
    )


@contextlib.contextmanager
def _serving(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}/score"
    finally:
        server.shutdown()
        server.server_close()


def _http(url: str, **args) -> Reward:
    return build_reward(RewardSpec(name="http", args={"url": url, "backoff_s": 0.0, **args}))


class _Counting:
    """A score function that counts calls and misbehaves on the first ``faulty`` of them."""

    def __init__(self, faulty: int = 0, fault: Callable[[], None] | None = None) -> None:
        self.calls = 0
        self.faulty = faulty
        self.fault = fault
        self.seen: list[tuple[torch.Tensor, RewardBatch]] = []

    def __call__(self, images: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        self.calls += 1
        self.seen.append((images, batch))
        if self.calls <= self.faulty:
            self.fault()
        return mean_gradient_magnitude(images)


def test_scores_round_trip_in_both_encodings() -> None:
    images, clean = _images(0), _images(1)
    score = _Counting()
    with _serving(ScorerServer(score)) as url:
        exact = _http(url, encoding="npy", send_clean=True)(images, _batch(clean))
        png = _http(url)(images, _batch(clean))
        negated = _http(url, encoding="npy", higher_is_better=False)(images, _batch())
    torch.testing.assert_close(exact, mean_gradient_magnitude(images), rtol=0, atol=0)
    quantised = torch.stack([to_tensor(to_uint8(image)) for image in images])  # what a PNG carries
    torch.testing.assert_close(png, mean_gradient_magnitude(quantised), rtol=0, atol=0)
    torch.testing.assert_close(negated, -exact)

    received, batch = score.seen[0]
    torch.testing.assert_close(received, images, rtol=0, atol=0)
    torch.testing.assert_close(batch.clean, clean, rtol=0, atol=0)
    assert batch.captions == [f"face {i}" for i in range(COUNT)] and batch.metadata[3] == {"id": 3}
    assert score.seen[1][1].clean is None  # send_clean off: clean faces stay home


def test_a_timeout_is_retried_then_fails_clearly() -> None:
    # Margins for a loaded machine: an answering attempt takes milliseconds, a hanging one 2 s.
    slow = _Counting(faulty=1, fault=lambda: time.sleep(2.0))
    with _serving(ScorerServer(slow)) as url:
        scores = _http(url, timeout_s=0.8, retries=1)(_images(), _batch())  # 2nd attempt answers
    assert slow.calls == 2 and torch.isfinite(scores).all()

    hanging = _Counting(faulty=99, fault=lambda: time.sleep(2.0))
    with (
        _serving(ScorerServer(hanging)) as url,
        pytest.raises(
            RewardError, match=rf"scorer {url} failed 2 attempts; last: no answer within timeout_s=0.8 s"
        ),
    ):
        _http(url, timeout_s=0.8, retries=1)(_images(), _batch())
    assert hanging.calls == 2


def test_server_errors_are_retried_and_bad_requests_are_not() -> None:
    def explode() -> None:
        raise RuntimeError("model not loaded yet")

    flaky = _Counting(faulty=2, fault=explode)
    with _serving(ScorerServer(flaky)) as url:
        scores = _http(url, retries=2, encoding="npy")(_images(), _batch())
        torch.testing.assert_close(scores, mean_gradient_magnitude(_images()))
        assert flaky.calls == 3
    broken = _Counting(faulty=99, fault=explode)
    with (
        _serving(ScorerServer(broken)) as url,
        pytest.raises(RewardError, match=r"failed 2 attempts; last: HTTP 500 .*model not loaded yet"),
    ):
        _http(url, retries=1)(_images(), _batch())
    assert broken.calls == 2
    with pytest.raises(ValueError, match=r"captions must be a list of 4 strings"):
        decode_request(json.dumps({"encoding": "npy", "count": 4, "images": encode_images(_images(), "npy"),
                                   "captions": ["too few"]}).encode())  # fmt: skip


class _Raw(BaseHTTPRequestHandler):
    """Answers every POST with the class's ``status`` and ``body`` and counts the requests."""

    status = 200
    body = b""
    requests = 0

    def do_POST(self) -> None:  # http.server's naming
        type(self).requests += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (200, b"<html>oops</html>", r"answered with invalid JSON"),
        (200, b'{"score": [1, 2, 3, 4]}', r"answered without a 'scores' list"),
        (200, b'{"scores": [1, 2, 3]}', r"returned 3 scores for 4 images"),
        (200, b'{"scores": [1, "2", true, 4]}', r"non-finite scores \(index, value\): \[\(1, '2'\), \(2, True\)\]"),
        (200, b'{"scores": [1, 2, NaN, 4]}', r"invalid JSON \(NaN is not a number\)"),
        (200, b'{"scores": [1, 2, 1e999, 4]}', r"non-finite scores .*\(2, inf\)"),
        (422, b'{"error": "images must be 512 px"}', r"rejected the request \(HTTP 422 .*images must be 512 px"),
    ],
)  # fmt: skip
def test_malformed_answers_fail_at_once_naming_the_url(status: int, body: bytes, message: str) -> None:
    handler = type("Handler", (_Raw,), {"status": status, "body": body, "requests": 0})
    with (
        _serving(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url,
        pytest.raises(RewardError, match=rf"scorer {url} .*{message}"),
    ):
        _http(url, retries=3)(_images(), _batch())
    assert handler.requests == 1  # retrying would not fix the answer


def test_null_scores_become_nan_and_bad_args_fail_early() -> None:
    handler = type("Handler", (_Raw,), {"body": b'{"scores": [1.5, null, 2, 3], "model": "x"}'})
    with _serving(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        scores = _http(url)(_images(), _batch())
    assert scores[0] == 1.5 and torch.isnan(scores[1]) and scores[3] == 3
    with pytest.raises(RewardError, match="url must start with http"):
        _http("localhost:8000")
    with pytest.raises(RewardError, match=r"bad args .*missing a required argument: 'url'"):
        build_reward(RewardSpec(name="http"))
    with pytest.raises(RewardError, match="environment variable 'NO_SUCH_TOKEN_VAR' is not set"):
        _http("http://127.0.0.1:1/", token_env="NO_SUCH_TOKEN_VAR")
    with pytest.raises(
        ValueError, match="'http' compares each image with its clean face, but batch.clean is None"
    ):
        _http("http://127.0.0.1:1/", send_clean=True)(_images(), _batch())


def test_an_unreachable_scorer_fails_clearly_after_its_retries() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/score"
    with pytest.raises(RewardError, match=rf"scorer {url} failed 3 attempts; last: cannot reach it: .*refused"):
        _http(url, retries=2)(_images(), _batch())
