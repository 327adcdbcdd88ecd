"""Key routes: revoke the key a request is made with (e.g. a key that leaked)."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request, Response

from api.deps import BEARER_SECURITY, UNAUTHORIZED_RESPONSE, authenticate, bearer_key
from api.state import AppState
from persistence import api_store

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.delete(
    "/current",
    status_code=204,
    responses={204: {"description": "The key is revoked; every later request with it is 401"}, **UNAUTHORIZED_RESPONSE},
    openapi_extra=BEARER_SECURITY,
)
async def revoke_current_key(request: Request) -> Response:
    """Revoke the API key this request is authenticated with. It is refused by this API process
    from the next request on, and by the others within milliseconds on Postgres (``NOTIFY``), at
    most 5 seconds otherwise. Other keys (``ssql keys create``) are not affected."""
    state: AppState = request.app.state.ssql
    key = bearer_key(request.headers.get("authorization"))
    owner = await authenticate(state, key)
    assert key is not None
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    async with state.engine.connect() as conn:
        await api_store.revoke_key(conn, owner, key_hash)
    state.keys.forget(key_hash)
    return Response(status_code=204)
