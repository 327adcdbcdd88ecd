"""Error responses: every input problem is a 422 whose ``loc`` names the field, like FastAPI's own."""

from __future__ import annotations

import logging
import socket
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.redact import redact
from persistence.models import JOB_KINDS

log = logging.getLogger("ssql.api")

#: discriminator tags FastAPI inserts into ``loc`` for the job-kind union; users never typed them
_UNION_TAGS = set(JOB_KINDS) - {"export"}


class FieldError(Exception):
    """A request field is invalid; ``loc`` is the path to it, e.g. ``("body", "epochs")``."""

    def __init__(self, loc: tuple[str | int, ...], reason: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {reason}")
        self.loc = loc
        self.reason = reason


class FieldErrors(FieldError):
    """Several fields are invalid: one 422 names them all (a form marks every one at once)."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(errors[0].loc, errors[0].reason)
        self.errors = errors


def printable(value: Any) -> Any:
    """A string that UTF-8 can encode (a lone surrogate from a ``\\ud800``-style escape in the
    request becomes the escape text again); anything else unchanged. Response JSON is UTF-8: an unpaired
    surrogate echoed back in ``loc`` or ``msg`` would turn a 422 into a 500."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _detail(loc: tuple[str | int, ...], reason: str) -> dict[str, Any]:
    return {"loc": [printable(p) for p in loc], "msg": printable(redact(reason)), "type": "value_error"}


def unprocessable(loc: tuple[str | int, ...], reason: str) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [_detail(loc, reason)]})


async def field_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FieldError)
    errors = exc.errors if isinstance(exc, FieldErrors) else [exc]
    return JSONResponse(status_code=422, content={"detail": [_detail(e.loc, e.reason) for e in errors]})


async def request_validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, with the union tag removed so ``loc`` is the path the user wrote."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        if len(loc) > 1 and loc[0] == "body" and loc[1] in _UNION_TAGS:
            del loc[1]
        msg = err.get("msg")
        if err.get("type") == "json_invalid":  # the body as a whole is no JSON: say why and where
            why, pos = (err.get("ctx") or {}).get("error"), loc[1] if len(loc) > 1 else None
            msg = f"{msg}: {why}" if why else msg
            if isinstance(pos, int) and pos > 0:
                msg += f" (at character {pos})"
            loc = ["body"]
        errors.append({"loc": [printable(p) for p in loc], "msg": printable(redact(msg)), "type": err.get("type")})
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


#: what a 503 asks clients to wait before trying again (seconds)
RETRY_AFTER_S = 5
#: the OpenAPI description of the 503 answer (every operation that reads the database)
SERVICE_UNAVAILABLE_RESPONSE: dict[int | str, dict[str, Any]] = {
    503: {"description": "The database is unreachable (restart, failover, outage): try again after `Retry-After` seconds"}
}


def _outage_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the database (or another backend) is away", not a bug: refused or
    reset connections, timeouts, a server shutting down or starting up, too many connections."""
    import asyncpg
    from sqlalchemy import exc as sa_exc

    return (
        ConnectionError, TimeoutError, socket.gaierror,  # connect refused / reset, DNS, connect timeout
        sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError,
        sa_exc.DBAPIError,  # only with connection_invalidated (outage_handler re-raises the rest)
        asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
        asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.TooManyConnectionsError,
    )  # fmt: skip


OUTAGE_EXCEPTIONS = _outage_exceptions()


async def outage_handler(_request: Request, exc: Exception) -> JSONResponse:
    """503 with ``Retry-After`` while the database is unreachable (it was a 500)."""
    from sqlalchemy import exc as sa_exc

    if (isinstance(exc, sa_exc.DBAPIError) and not isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
            and not exc.connection_invalidated):
        raise exc  # a real error of a statement (constraint, syntax): the server error it is
    log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return JSONResponse(
        status_code=503,
        content={"detail": "the database is unreachable; try again shortly", "code": "database_unavailable"},
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )
