"""Request body size limit (``SSQL_MAX_BODY_BYTES``, default 1 MiB): a pure-ASGI middleware.

A declared ``Content-Length`` above the limit is refused with 413 before any byte is read; a body
without one (chunked) is counted as it streams in and refused as soon as it passes the limit, so
no request body larger than the limit is ever held in memory. Every JSON body of the API is a
few kilobytes at most; the limit only stops abuse (docs/decisions/008).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: the OpenAPI description of the 413 answer (added to every route that takes a body)
TOO_LARGE_RESPONSE = {413: {"description": "Request body above the server's limit (`SSQL_MAX_BODY_BYTES`, default 1 MiB)"}}


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the limit (FastAPI re-raises HTTPExceptions
    of its body reader as they are, so the route answers 413)."""

    def __init__(self, limit: int, setting: str = "SSQL_MAX_BODY_BYTES") -> None:
        super().__init__(413, f"request body larger than {limit} bytes (the server's {setting})")


class BodySizeLimit:
    """Refuse request bodies above ``max_bytes`` with 413 (``max_bytes <= 0``: no limit).

    ``uploads`` maps (method, path) of a route that streams a large body (a dataset archive) to
    its own (limit, setting name), e.g. ``SSQL_MAX_UPLOAD_BYTES``."""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[tuple[str, str], tuple[int, str]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upload = self.uploads.get((scope.get("method", ""), scope.get("path", ""))) if scope["type"] == "http" else None
        limit, setting = upload if upload is not None else (self.max_bytes, "SSQL_MAX_BODY_BYTES")
        if scope["type"] != "http" or limit <= 0:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(send, limit, setting)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _send_413(send, limit, setting)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit: int, setting: str = "SSQL_MAX_BODY_BYTES") -> None:
    body: dict[str, Any] = {"detail": BodyTooLarge(limit, setting).detail}
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": payload})
