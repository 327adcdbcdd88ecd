"""Error responses: every input problem is a 422 whose ``loc`` names the field, like FastAPI's own."""

from __future__ import annotations

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

#: discriminator tags FastAPI inserts into ``loc`` for the job-kind union; users never typed them
_UNION_TAGS = {"pretrain", "eval", "distill"}


class FieldError(Exception):
    """A request field is invalid; ``loc`` is the path to it, e.g. ``("body", "epochs")``."""

    def __init__(self, loc: tuple[str | int, ...], reason: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {reason}")
        self.loc = loc
        self.reason = reason


def unprocessable(loc: tuple[str | int, ...], reason: str) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": list(loc), "msg": reason, "type": "value_error"}]},
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
        errors.append({"loc": loc, "msg": err.get("msg"), "type": err.get("type")})
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})
