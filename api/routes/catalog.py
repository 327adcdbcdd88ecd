"""What this server accepts: datasets, backbones, methods, bit-widths and limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import SettingsDep
from ssql_core.catalog import catalog as core_catalog

router = APIRouter(tags=["catalog"])


@router.get("/v1/catalog")
async def get_catalog(settings: SettingsDep) -> dict[str, Any]:
    """The library's catalog, with this server's limits applied on top (no auth needed)."""
    cat = dict(core_catalog())
    limits = dict(cat.get("limits") or {})
    limits.update(
        max_epochs=settings.max_epochs,
        max_eval_epochs=settings.max_eval_epochs,
        max_batch_size=settings.max_batch_size,
        max_image_size=settings.max_image_size,
        max_bits_per_eval=settings.max_bits_per_eval,
        max_attempts=settings.max_attempts,
        allow_download=settings.allow_download,
    )
    cat["limits"] = limits
    cat["job_kinds"] = ["pretrain", "eval"]
    return cat
