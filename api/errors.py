"""Error responses: every input problem is a 422 whose ``loc`` names the field, like FastAPI's own."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from persistence.models import JOB_KINDS

#: discriminator tags FastAPI inserts into ``loc`` for the job-kind union; users never typed them
_UNION_TAGS = set(JOB_KINDS) - {"export"}


class FieldError(Exception):
    """A request field is invalid; ``loc`` is the path to it, e.g. ``("body", "epochs")``."""

    def __init__(self, loc: tuple[str | int, ...], reason: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {reason}")
        self.loc = loc
        self.reason = reason


def printable(value: Any) -> Any:
    """A string that UTF-8 can encode (a lone surrogate from a ``\\ud800``-style escape in the
    request becomes the escape text again); anything else unchanged. Response JSON is UTF-8: an unpaired
    surrogate echoed back in ``loc`` or ``msg`` would turn a 422 into a 500."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def unprocessable(loc: tuple[str | int, ...], reason: str) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": [printable(p) for p in loc], "msg": printable(reason), "type": "value_error"}]},
    )


async def field_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FieldError)
    return unprocessable(exc.loc, exc.reason)


async def request_validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, with the union tag removed so ``loc`` is the path the user wrote."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        if len(loc) > 1 and loc[0] == "body" and loc[1] in _UNION_TAGS:
            del loc[1]
        errors.append({"loc": [printable(p) for p in loc], "msg": printable(err.get("msg")), "type": err.get("type")})
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})
