"""JSON answers and the one error type handlers raise: {"error": code, "message": sentence}."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class Problem(Exception):
    """A request answered with an error status; never carries a traceback to the client."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def reply(body: Any, status: int = 200) -> web.Response:
    # Compact and UTF-8: `curl | jq` reads it either way, and /stats is polled.
    return web.json_response(body, status=status, dumps=_dumps)


def error_reply(status: int, error: str, message: str) -> web.Response:
    return reply({"error": error, "message": message}, status)


def _dumps(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)
