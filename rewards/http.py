"""HTTP reward: score faces with a model served elsewhere (another framework, machine or team).

``HTTPReward`` (registered as ``http``) POSTs each reward call (one chunk of at most the reward
actor's batch size) to ``url`` and reads one score per image back, using only the standard
library::

    stage2:
      rewards:
        - {name: http, weight: 1.0, args: {url: "http://10.0.0.5:8000/score", timeout_s: 30}}

Wire format. Request: ``POST url`` with ``Content-Type: application/json`` and a UTF-8 JSON
object (version 1)::

    {"version": 1,
     "reward": "http",                  # the reward's name (informational)
     "encoding": "png" | "npy",         # how "images" and "clean" are encoded
     "count": N,                        # number of images
     "images": ...,                     # N faces, encoded as below
     "clean": ... | null,               # the N clean (ground-truth) faces, only with send_clean
     "captions": ["...", ...],          # N strings, "" where a face has no caption
     "metadata": [{...}, ...]}          # N objects (values JSON cannot hold are sent as strings)

- ``encoding: "png"``: a list of N strings, each the standard padded base64 of a PNG file, 8-bit
  RGB, H x W, pixel value ``round((x + 1) * 127.5)`` of the [-1, 1] image ``x`` (clamped).
- ``encoding: "npy"``: one string, the base64 of a ``.npy`` file (``numpy.save``) holding a
  little-endian float32 array ``[N, 3, H, W]`` of the images in [-1, 1], exactly as the policy
  produced them.

Response: HTTP 200 with the JSON object ``{"scores": [s_1, ..., s_N]}``: one number per image in
request order, higher is better unless ``higher_is_better: false``; ``null`` marks an image the
scorer cannot score (it becomes NaN and the aggregator drops that sample). Other keys are ignored.

Failures: a connection error, a timeout (``timeout_s`` per request), HTTP 408/429 or 5xx is
retried up to ``retries`` times, waiting ``backoff_s * 2**attempt`` seconds between attempts;
other 4xx answers and malformed responses (not JSON, no ``scores`` list, a wrong count, a value
that is not a finite number or null) fail at once. Each raises :class:`~rewards.base.RewardError`
naming the URL; the reward worker then applies the reward's error policy. Keep the worker's
per-call ``timeout_s`` above ``(retries + 1) * timeout_s`` plus the back-off here.

A reference scorer that serves any rlrestore reward in this format (127.0.0.1 unless ``--host``
says otherwise)::

    python -m rewards.http --reward sharpness --port 8000
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.base import Reward, RewardBatch, RewardError, build_reward, register_reward
from rlrestore.config import RewardSpec
from rlrestore.data import to_tensor, to_uint8

__all__ = [
    "WIRE_VERSION",
    "HTTPReward",
    "ScorerServer",
    "decode_images",
    "decode_request",
    "encode_images",
    "encode_request",
    "main",
]

log = logging.getLogger(__name__)

WIRE_VERSION = 1
Encoding = Literal["png", "npy"]
_RETRY_STATUS = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})


def encode_images(images: Tensor, encoding: Encoding) -> str | list[str]:
    """``[N, 3, H, W]`` images in [-1, 1] as the wire format's ``images`` field."""
    if encoding == "png":
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(to_uint8(image)).save(buffer, format="PNG", compress_level=1)
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return encoded
    if encoding == "npy":
        buffer = io.BytesIO()
        np.save(buffer, images.detach().to("cpu", torch.float32).numpy().astype("<f4"), allow_pickle=False)
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    raise ValueError(f"encoding must be 'png' or 'npy', got {encoding!r}")


def decode_images(payload: Any, encoding: Encoding, count: int) -> Tensor:
    """Inverse of :func:`encode_images`: ``[count, 3, H, W]`` float32 in [-1, 1]; ValueError if malformed."""
    try:
        if encoding == "png":
            if not isinstance(payload, list) or len(payload) != count:
                raise ValueError(f"expected a list of {count} base64 PNG strings")
            arrays = []
            for item in payload:
                with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as image:
                    arrays.append(np.asarray(image.convert("RGB")))
            images = (
                torch.stack([to_tensor(array) for array in arrays]) if arrays else torch.empty(0, 3, 0, 0)
            )
        elif encoding == "npy":
            array = np.load(io.BytesIO(base64.b64decode(payload, validate=True)), allow_pickle=False)
            images = torch.from_numpy(np.array(array, dtype=np.float32))
        else:
            raise ValueError(f"encoding must be 'png' or 'npy', got {encoding!r}")
    except (TypeError, ValueError, OSError) as exc:
        raise ValueError(f"cannot decode {encoding} images: {exc}") from exc
    if images.ndim != 4 or images.shape[0] != count or images.shape[1] != 3:
        raise ValueError(f"expected {count} images [N, 3, H, W], got shape {tuple(images.shape)}")
    return images


def encode_request(
    name: str, images: Tensor, batch: RewardBatch, encoding: Encoding, send_clean: bool
) -> bytes:
    """The JSON body of one scoring request (see the module docstring)."""
    body = {
        "version": WIRE_VERSION,
        "reward": name,
        "encoding": encoding,
        "count": images.shape[0],
        "images": encode_images(images, encoding),
        "clean": encode_images(batch.clean, encoding) if send_clean else None,
        "captions": batch.captions,
        "metadata": batch.metadata,
    }
    return json.dumps(body, default=str).encode("utf-8")


def decode_request(body: bytes) -> tuple[Tensor, RewardBatch]:
    """(images, batch) of a request body; ValueError naming what is malformed."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the request is not JSON: {exc}") from exc
    required = {"encoding", "count", "images", "captions"}
    missing = sorted(required - set(request)) if isinstance(request, dict) else sorted(required)
    if missing:
        raise ValueError(f"the request must be a JSON object with {sorted(required)}; it lacks {missing}")
    count, encoding = request["count"], request["encoding"]
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    images = decode_images(request["images"], encoding, count)
    clean = None if request.get("clean") is None else decode_images(request["clean"], encoding, count)
    captions = request["captions"]
    if not (
        isinstance(captions, list) and len(captions) == count and all(isinstance(c, str) for c in captions)
    ):
        raise ValueError(f"captions must be a list of {count} strings")
    metadata = request.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, list) and len(metadata) == count and all(isinstance(m, dict) for m in metadata)
    ):
        raise ValueError(f"metadata must be a list of {count} objects")
    return images, RewardBatch(captions, clean=clean, metadata=metadata)


@register_reward("http")
class HTTPReward(Reward):
    """A reward computed by an HTTP scorer (wire format: the module docstring).

    ``url``: the scorer's endpoint. ``timeout_s``: seconds per request. ``retries``: extra
    attempts after a connection error, timeout, HTTP 408/429 or 5xx, with exponential back-off
    from ``backoff_s``. ``encoding``: ``png`` (8-bit, small) or ``npy`` (exact float32).
    ``send_clean``: also send the clean faces (a fidelity scorer; the batch must have them).
    ``higher_is_better``: False negates the returned scores. ``token_env``: name of an
    environment variable whose value is sent as ``Authorization: Bearer <value>`` (the token
    stays out of the config).
    """

    resources: ClassVar[dict[str, float]] = {"num_cpus": 0.1, "num_gpus": 0.0}

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        url: str,
        timeout_s: float = 60.0,
        retries: int = 2,
        backoff_s: float = 1.0,
        encoding: Encoding = "png",
        send_clean: bool = False,
        higher_is_better: bool = True,
        token_env: str | None = None,
    ) -> None:
        super().__init__(device)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(
                f"need timeout_s > 0, retries >= 0, backoff_s >= 0; got {timeout_s}, {retries}, {backoff_s}"
            )
        if encoding not in ("png", "npy"):
            raise ValueError(f"encoding must be 'png' or 'npy', got {encoding!r}")
        if token_env is not None and not os.environ.get(token_env):
            raise ValueError(f"token_env: environment variable {token_env!r} is not set")
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.encoding: Encoding = encoding
        self.needs_clean = send_clean
        self.higher_is_better = higher_is_better
        self.headers = {"Content-Type": "application/json"}
        if token_env is not None:
            self.headers["Authorization"] = f"Bearer {os.environ[token_env]}"

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        body = encode_request(self.name, images, batch, self.encoding, self.needs_clean)
        return self._parse(self._post(body), images.shape[0])

    def _post(self, body: bytes) -> bytes:
        """The response body of a successful POST, after up to ``retries`` retried failures."""
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                failure = f"HTTP {exc.code} {exc.reason}: {detail}"
                if exc.code < 500 and exc.code not in _RETRY_STATUS:
                    raise RewardError(f"scorer {self.url} rejected the request ({failure})") from exc
            except TimeoutError as exc:
                failure = f"no answer within timeout_s={self.timeout_s:g} s ({exc})"
            except urllib.error.URLError as exc:
                failure = f"cannot reach it: {exc.reason}"
            except OSError as exc:  # connection reset or refused mid-request
                failure = f"{type(exc).__name__}: {exc}"
            log.warning("scorer %s, attempt %d of %d: %s", self.url, attempt + 1, self.retries + 1, failure)
        raise RewardError(f"scorer {self.url} failed {self.retries + 1} attempts; last: {failure}")

    def _parse(self, raw: bytes, count: int) -> Tensor:
        """Scores ``[count]`` from a response body, or RewardError saying what is malformed."""

        def reject(constant: str) -> None:
            raise ValueError(f"{constant} is not a number")

        try:
            answer = json.loads(raw, parse_constant=reject)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RewardError(f"scorer {self.url} answered with invalid JSON ({exc}): {raw[:200]!r}") from exc
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list):
            raise RewardError(f"scorer {self.url} answered without a 'scores' list: {raw[:200]!r}")
        if len(scores) != count:
            raise RewardError(f"scorer {self.url} returned {len(scores)} scores for {count} images")
        bad = [
            (index, value)
            for index, value in enumerate(scores)
            if value is not None
            and (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value))
        ]
        if bad:
            raise RewardError(
                f"scorer {self.url} returned non-numeric or non-finite scores (index, value): {bad[:5]}; "
                "send a finite number, or null for an image it cannot score"
            )
        return torch.tensor(
            [math.nan if value is None else float(value) for value in scores], dtype=torch.float32
        )


ScoreFunction = Callable[[Tensor, RewardBatch], Tensor]


class ScorerServer(ThreadingHTTPServer):
    """A reference scorer speaking the wire format: ``score(images, batch)`` answers each POST.

    Answers 400 with ``{"error": ...}`` for a malformed request and 500 for a failing ``score``.
    ``port=0`` picks a free port (see :attr:`url`). Run it with ``serve_forever()``.
    """

    daemon_threads = True

    def __init__(self, score: ScoreFunction, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _ScorerHandler)
        self.score = score

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _ScorerHandler(BaseHTTPRequestHandler):
    server: ScorerServer

    def do_POST(self) -> None:  # http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            images, batch = decode_request(body)
        except ValueError as exc:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        try:
            scores = self.server.score(images, batch).tolist()
        except Exception as exc:  # reported to the client as a server error
            log.exception("scoring failed")
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._answer(HTTPStatus.OK, {"scores": [value if math.isfinite(value) else None for value in scores]})

    def _answer(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client %s left before the answer (its timeout?)", self.address_string())

    def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
        log.debug("%s - %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> None:
    """Serve one rlrestore reward over HTTP in the wire format of :class:`HTTPReward`."""
    parser = argparse.ArgumentParser(prog="python -m rewards.http", description=main.__doc__)
    parser.add_argument("--reward", required=True, help="registered name, plugin name or module:Class")
    parser.add_argument("--args", default="{}", help="the reward's constructor arguments as a JSON object")
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument("--device", default="cpu", help="torch device of the reward")
    options = parser.parse_args(argv)
    reward = build_reward(RewardSpec(name=options.reward, args=json.loads(options.args)), options.device)
    logging.basicConfig(level=logging.INFO)
    with ScorerServer(reward, options.host, options.port) as server:
        log.info("serving reward %r at %s (Ctrl-C stops)", reward.name, server.url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
