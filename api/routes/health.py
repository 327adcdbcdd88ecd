"""Liveness and readiness: ``/readyz`` checks that the database and the broker answer."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import StateDep
from api.redact import redact

router = APIRouter(tags=["health"])
#: what a 503 tells clients to wait before trying again (the database or broker is away)
RETRY_AFTER_S = 5


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _broker_ping(celery) -> None:  # type: ignore[no-untyped-def]
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


@router.get("/readyz", responses={503: {"description": "database or broker unreachable"}})
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when the database and the broker are reachable."""
    checks: dict[str, str] = {}
    try:
        with anyio.fail_after(3):
            async with state.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        checks["database"] = redact(f"error: {type(e).__name__}: {e}")
    try:
        with anyio.fail_after(5):
            await anyio.to_thread.run_sync(_broker_ping, state.celery, abandon_on_cancel=True)
        checks["broker"] = "ok"
    except Exception as e:  # noqa: BLE001
        checks["broker"] = redact(f"error: {type(e).__name__}: {e}")
    ok = all(v == "ok" for v in checks.values())
    headers = None if ok else {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503,
                        headers=headers)
