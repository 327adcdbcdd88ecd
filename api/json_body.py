"""Request bodies are UTF-8 JSON (RFC 8259 8.1), nothing else.

Starlette's ``Request.json()`` hands the raw bytes to ``json.loads``, which guesses UTF-16 and
UTF-32 from the first bytes: a UTF-16 body (with or without a byte order mark) was accepted. The
routes that take a body use :class:`Utf8JsonRoute`, whose request decodes the bytes as strict
UTF-8 first; anything else (a UTF-16/32 body, a byte order mark, bytes that are no UTF-8) is the
422 of a body that is not valid JSON (docs/decisions/014).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class Utf8JsonRequest(Request):
    """A request whose JSON body must be UTF-8 text."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                raise json.JSONDecodeError(f"the body is not UTF-8 (byte {e.start}); send JSON as UTF-8", "", 0) from None
            if text.startswith("\ufeff"):
                raise json.JSONDecodeError("the body starts with a byte order mark; send JSON as UTF-8 without one", "", 0)
            self._json = json.loads(text)
        return self._json


class Utf8JsonRoute(APIRoute):
    """An API route whose body is read by :class:`Utf8JsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def utf8_handler(request: Request) -> Response:
            return await handler(Utf8JsonRequest(request.scope, request.receive))

        return utf8_handler
