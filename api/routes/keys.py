"""Key routes: an owner lists, creates and revokes their own API keys (the dashboard's keys page).

A new key's secret is in the answer to its creation only (the database keeps its sha256). A
revoked key is refused by the API process that revoked it from the next request on, and by the
others within milliseconds on Postgres (``NOTIFY``, migration 0004), at most a second otherwise.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import (
    BEARER_SECURITY,
    UNAUTHORIZED_RESPONSE,
    Conn,
    Owner,
    StateDep,
    authenticate,
    bearer_key,
)
from api.schemas import NAME_PATTERN, _matching
from api.state import AppState
from api.views import _ts as iso
from persistence import api_store
from persistence.keys import hash_key, new_key

router = APIRouter(prefix="/v1/keys", tags=["keys"])

KeyLabel = Annotated[str, Field(max_length=100, json_schema_extra={"pattern": NAME_PATTERN}),
                     _matching(NAME_PATTERN, "a label must not contain control characters (newlines, tabs, NUL)")]
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1, description="a key's id (as GET /v1/keys lists it)")]
NO_STORE = {"Cache-Control": "no-store"}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"label": "laptop"}})

    label: KeyLabel | None = Field(None, description="your words for the key (where it is used), up to 100 characters")


class KeyOut(BaseModel):
    id: int
    prefix: str = Field(description="the key's first characters, as shown wherever keys are listed")
    label: str | None
    created_at: str
    revoked_at: str | None
    current: bool = Field(description="the key this request was made with")


class KeyList(BaseModel):
    items: list[KeyOut]


class KeyCreated(KeyOut):
    key: str = Field(description="the secret: shown in this answer only, never again")


def _view(row: Any, current_hash: str | None) -> dict[str, Any]:
    return {"id": row["id"], "prefix": row["prefix"], "label": row["label"], "created_at": iso(row["created_at"]),
            "revoked_at": iso(row["revoked_at"]), "current": row["key_hash"] == current_hash}


def _current_hash(request: Request) -> str | None:
    key = bearer_key(request.headers.get("authorization"))
    return hashlib.sha256(key.encode()).hexdigest() if key else None


@router.get("", response_model=KeyList, responses=UNAUTHORIZED_RESPONSE)
async def list_keys(request: Request, owner: Owner, conn: Conn) -> JSONResponse:
    """Your API keys, newest first, revoked ones included (never their secrets)."""
    current = _current_hash(request)
    return JSONResponse({"items": [_view(r, current) for r in await api_store.list_keys(conn, owner)]}, headers=NO_STORE)


@router.post("", status_code=201, response_model=KeyCreated,
             responses={**UNAUTHORIZED_RESPONSE, 409: {"description": f"you hold {api_store.MAX_ACTIVE_KEYS} unrevoked keys already"}})
async def create_key(body: KeyCreate, owner: Owner, conn: Conn) -> JSONResponse:
    """Create a key for yourself. Its secret (``key``) is in this answer only: copy it now."""
    secret = new_key()
    row = await api_store.add_key(conn, owner, hash_key(secret), secret[:12], body.label)
    if row is None:
        raise HTTPException(409, f"you hold {api_store.MAX_ACTIVE_KEYS} unrevoked keys already: revoke one first")
    return JSONResponse({**_view(row, None), "key": secret}, status_code=201, headers=NO_STORE)


@router.delete(
    "/current",
    status_code=204,
    responses={204: {"description": "The key is revoked; every later request with it is 401"}, **UNAUTHORIZED_RESPONSE},
    openapi_extra=BEARER_SECURITY,
)
async def revoke_current_key(request: Request) -> Response:
    """Revoke the API key this request is authenticated with. It is refused by this API process
    from the next request on, and by the others within milliseconds on Postgres (``NOTIFY``), at
    most a second otherwise. Other keys (``ssql keys create``) are not affected."""
    state: AppState = request.app.state.ssql
    key = bearer_key(request.headers.get("authorization"))
    owner = await authenticate(state, key)
    assert key is not None
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    async with state.engine.connect() as conn:
        await api_store.revoke_key(conn, owner, key_hash)
    state.keys.forget(key_hash)
    return Response(status_code=204)


@router.delete("/{key_id}", status_code=204,
               responses={204: {"description": "The key is revoked (or already was); every later request with it is 401"},
                          404: {"description": "you have no key with this id"}, **UNAUTHORIZED_RESPONSE})
async def revoke_key(key_id: KeyId, owner: Owner, conn: Conn, state: StateDep) -> Response:
    """Revoke one of your keys (the one this request uses too, if you name it: you are then signed
    out). Refused at once by this API process, within milliseconds by the others on Postgres."""
    row = await api_store.revoke_key_by_id(conn, owner, key_id)
    if row is None:
        raise HTTPException(404, "you have no key with this id")
    state.keys.forget(row["key_hash"])
    return Response(status_code=204)
