"""HTTP reward: score faces with a model served elsewhere (another framework, machine or team).

``HTTPReward`` (registered as ``http``) POSTs each reward call (one chunk of at most the reward
actor's batch size) to ``url`` and reads one score per image back, with ``requests`` and
urllib3's ``Retry``::

    stage2:
      rewards:
        - {name: http, weight: 1.0, args: {url: "http://10.0.0.5:8000/score", timeout_s: 30}}

A scorer on the same Ray cluster is better called by handle, without HTTP: the ``serve`` reward
(``rewards.serving``). ``rlrestore serve-reward NAME`` serves any rlrestore reward in this wire
format (on 127.0.0.1 unless ``--host`` says otherwise), as a Ray Serve application.

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
retried up to ``retries`` times by urllib3's ``Retry`` (mounted on a ``requests`` session), with
its exponential back-off: no wait before the first retry, then ``backoff_s * 2**k`` seconds
(capped at 120 s; a 429/503 answer's ``Retry-After`` header is honoured). Other 4xx answers and
malformed responses (not JSON, no ``scores`` list, a wrong count, a value that is not a finite
number or null) fail at once. Each raises :class:`~rewards.base.RewardError` naming the URL; the
reward worker then applies the reward's error policy. Keep the worker's per-call ``timeout_s``
above ``(retries + 1) * timeout_s`` plus the back-off here.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from http import HTTPStatus
from typing import Any, ClassVar, Literal

import numpy as np
import requests
import torch
from PIL import Image
from requests.adapters import HTTPAdapter
from torch import Tensor
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

from rewards.base import Reward, RewardBatch, RewardError, register_reward
from rlrestore.data import to_tensor, to_uint8

__all__ = [
    "RETRY_STATUS",
    "WIRE_VERSION",
    "HTTPReward",
    "decode_images",
    "decode_request",
    "encode_images",
    "encode_request",
    "encode_scores",
    "retrying_session",
]


WIRE_VERSION = 1
Encoding = Literal["png", "npy"]
RETRY_STATUS = frozenset(
    {HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS, *(code for code in range(500, 600))}
)
"""Answers retried by the client: 408, 429 and every 5xx."""


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


def retrying_session(retries: int, backoff_s: float) -> requests.Session:
    """A ``requests`` session that retries POSTs ``retries`` times on connection errors, timeouts
    and :data:`RETRY_STATUS` answers, with urllib3's exponential back-off from ``backoff_s``; the
    last answer is returned (not raised) when every attempt got a retryable status."""
    retry = Retry(
        total=retries,
        allowed_methods=frozenset({"POST"}),
        status_forcelist=RETRY_STATUS,
        backoff_factor=backoff_s,
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def encode_scores(scores: Tensor) -> dict[str, list[float | None]]:
    """The JSON answer of a scorer: ``{"scores": [...]}``, ``null`` for a non-finite score."""
    return {"scores": [value if math.isfinite(value) else None for value in scores.tolist()]}


@register_reward("http")
class HTTPReward(Reward):
    """A reward computed by an HTTP scorer (wire format: the module docstring).

    ``url``: the scorer's endpoint. ``timeout_s``: seconds per request. ``retries``: extra
    attempts after a connection error, timeout, HTTP 408/429 or 5xx (urllib3 ``Retry``), with
    exponential back-off from ``backoff_s``. ``encoding``: ``png`` (8-bit, small) or ``npy`` (exact float32).
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
        self._session: requests.Session | None = None  # made on first use, where the reward runs

    def score(self, images: Tensor, batch: RewardBatch) -> Tensor:
        body = encode_request(self.name, images, batch, self.encoding, self.needs_clean)
        return self._parse(self._post(body), images.shape[0])

    def _post(self, body: bytes) -> bytes:
        """The response body of a successful POST, after up to ``retries`` retried failures."""
        if self._session is None:
            self._session = retrying_session(self.retries, self.backoff_s)
        attempts = f"failed {self.retries + 1} attempts; last"
        try:
            response = self._session.post(
                self.url, data=body, headers=self.headers, timeout=self.timeout_s, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise RewardError(f"scorer {self.url} {attempts}: {self._describe(exc)}") from exc
        if response.status_code < 300:
            return response.content
        detail = response.content[:300].decode("utf-8", "replace")
        failure = f"HTTP {response.status_code} {response.reason}: {detail}"
        if response.status_code in RETRY_STATUS:
            raise RewardError(f"scorer {self.url} {attempts}: {failure}")
        raise RewardError(f"scorer {self.url} rejected the request ({failure})")

    def _describe(self, exc: requests.RequestException) -> str:
        """What went wrong with a request that got no answer (urllib3's reason when it retried)."""
        reason: BaseException = exc
        if exc.args and isinstance(exc.args[0], MaxRetryError) and exc.args[0].reason is not None:
            reason = exc.args[0].reason
        if isinstance(reason, NewConnectionError):  # refused, unresolvable (a ConnectTimeoutError subclass)
            return f"cannot reach it: {reason}"
        if isinstance(reason, requests.Timeout | Urllib3Timeout | TimeoutError):
            return f"no answer within timeout_s={self.timeout_s:g} s ({reason})"
        return f"cannot reach it: {reason}"

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
