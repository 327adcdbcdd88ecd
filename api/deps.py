"""FastAPI dependencies: settings, a pooled DB connection, and the authenticated owner."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncConnection

from api.state import AppState
from persistence.settings import Settings

bearer = HTTPBearer(auto_error=False, description="API key created with `ssql keys create NAME`")


def app_state(request: Request) -> AppState:
    return request.app.state.ssql


def get_settings_dep(state: Annotated[AppState, Depends(app_state)]) -> Settings:
    return state.settings


async def get_conn(state: Annotated[AppState, Depends(app_state)]) -> AsyncIterator[AsyncConnection]:
    """One pooled connection per request (Core statements; no ORM session on hot paths)."""
    async with state.engine.connect() as conn:
        yield conn


async def authenticate(state: AppState, key: str | None) -> int:
    """The owner id of an API key (cached key hash -> owner), or 401."""
    if not key:
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    hit, owner = state.keys.get(key_hash)
    if not hit:
        generation = state.keys.generation
        owner = await state.reads.owner_for_key(key_hash)
        state.keys.put(key_hash, owner, generation)
    if owner is None:
        raise HTTPException(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
    return owner


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


async def current_owner(
    state: Annotated[AppState, Depends(app_state)],
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> int:
    """Dependency form of :func:`authenticate` (documents the Bearer scheme in OpenAPI)."""
    return await authenticate(state, creds.credentials if creds and creds.scheme.lower() == "bearer" else None)


#: the OpenAPI description of the 401 answer (every route that needs a key)
UNAUTHORIZED_RESPONSE = {401: {"description": "missing, invalid or revoked API key (`WWW-Authenticate: Bearer`)"}}

#: for routes that authenticate inline (hot paths): how OpenAPI learns they need the key
BEARER_SECURITY = {"security": [{"HTTPBearer": []}]}


#: a job id path parameter as the schema states it (a uuid as returned at submission; printable
#: ASCII of at most 36 characters). Not enforced by validation: any other string answers 404 like
#: an unknown id (docs/decisions/008), so the schema only documents it.
JobId = Annotated[str, Path(description="a job id (as returned by POST /v1/jobs); any other string is 404",
                            json_schema_extra={"maxLength": 36, "pattern": "^[ -~]{1,36}$"})]

Owner = Annotated[int, Depends(current_owner)]
Conn = Annotated[AsyncConnection, Depends(get_conn)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StateDep = Annotated[AppState, Depends(app_state)]
