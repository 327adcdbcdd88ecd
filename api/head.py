"""HEAD wherever GET is (RFC 9110 9.3.2): the same status and headers, no body.

FastAPI routes answer only the methods they declare, so ``HEAD`` was a 405 on every route
(checkpoint downloads included). This pure-ASGI middleware routes a HEAD request as a GET in a
copy of the scope (the server keeps its own ``HEAD`` scope and sends no body) and marks it
(:func:`is_head`): routes whose GET body is expensive (a file, a stream) answer a marked request
with the headers alone. The OpenAPI document lists the GET operations; HEAD is implied.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_MARK = "ssql.head"


def is_head(request: Request) -> bool:
    """Whether this (GET-routed) request was a HEAD: send the headers, skip the body's work."""
    return request.method == "HEAD" or bool(request.scope.get(_MARK))


class HeadAsGet:
    """Answer HEAD through the GET route; the body (if any) is dropped here, not sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        done = False

        async def headers_only(message: Message) -> None:
            nonlocal done
            if message["type"] == "http.response.body":
                if done:
                    return
                done = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET", _MARK: True}, receive, headers_only)
