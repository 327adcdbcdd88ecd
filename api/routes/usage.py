"""``GET /v1/usage``: the caller's quotas and what they use of them now (decision 014)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import UNAUTHORIZED_RESPONSE, Conn, Owner, SettingsDep
from persistence import quotas

router = APIRouter(prefix="/v1", tags=["usage"], responses=UNAUTHORIZED_RESPONSE)


@router.get("/usage")
async def get_usage(owner: Owner, conn: Conn, settings: SettingsDep) -> dict[str, Any]:
    """Your limits (``null``: none) and usage: queued + running jobs, running jobs, devices held,
    device-hours in the rolling period; when the budget frees if it is used up, and whether a
    submission would be accepted now (else the refusal it would get)."""
    return await quotas.usage_view(conn, owner, settings)
