"""A threaded HTTP scorer speaking the ``http`` reward's wire format, for the HTTP reward's tests.

Its score function is any callable, so a test can count calls and make the server slow or fail on
purpose. The scorer users run is ``rlrestore serve-reward`` (a Ray Serve application).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from torch import Tensor

from rewards import RewardBatch
from rewards.http import decode_request, encode_scores

log = logging.getLogger(__name__)

ScoreFunction = Callable[[Tensor, RewardBatch], Tensor]


class ScorerServer(ThreadingHTTPServer):
    """``score(images, batch)`` answers each POST; 400 ``{"error": ...}`` for a malformed request,
    500 for a failing ``score``. ``port=0`` picks a free port. Run it with ``serve_forever()``.

    ``server_close`` waits for the request threads (none is a daemon), so a deliberately slow
    answer never outlives its test and runs torch code while the interpreter shuts down.
    """

    def __init__(self, score: ScoreFunction, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _ScorerHandler)
        self.score = score


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
            scores = self.server.score(images, batch)
        except Exception as exc:  # reported to the client as a server error
            log.exception("scoring failed")
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            return
        self._answer(HTTPStatus.OK, encode_scores(scores))

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
