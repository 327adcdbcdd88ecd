"""The FastAPI application: ``uvicorn api.app:app`` (or ``ssql up``)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi

from api import web
from api.errors import FieldError, field_error_handler, request_validation_handler
from api.limits import BodySizeLimit
from api.routes import catalog, checkpoints, health, jobs, keys, logs
from api.state import AppState, KeyCache
from persistence.db import make_async_engine
from persistence.fast_reads import make_hot_reads
from persistence.queue import make_celery
from persistence.settings import Settings, get_settings


def _preload_and_freeze() -> None:
    """Import what request validation needs (torch comes with it), then exclude everything alive
    now from the cyclic GC: otherwise each full collection walks millions of long-lived objects
    and stalls every in-flight request for tens of milliseconds (the status route's p99)."""
    import ssql_core.data  # noqa: F401
    import ssql_core.distill  # noqa: F401
    import ssql_core.export  # noqa: F401
    import ssql_core.methods  # noqa: F401

    gc.collect()
    gc.freeze()


#: request model -> field -> the setting that caps it on this server (on top of the library's range)
_SERVER_MAXIMA = {
    "PretrainRequest": {"epochs": "max_epochs", "batch_size": "max_batch_size", "image_size": "max_image_size",
                        "devices": "max_devices"},
    "EvalRequest": {"epochs": "max_eval_epochs", "batch_size": "max_batch_size"},
    "DistillRequest": {"epochs": "max_epochs", "batch_size": "max_batch_size"},
}


def openapi_with_limits(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's OpenAPI document with this server's own limits in the request schemas
    (``SSQL_MAX_EPOCHS`` and friends), so a schema-valid request is not refused for a limit the
    schema did not state; also the registries' names (methods, backbones) as enums."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from ssql_core.methods import METHODS
    from ssql_core.models import BACKBONES

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.get("components", {}).get("schemas", {})
    for model, fields in _SERVER_MAXIMA.items():
        props = schemas.get(model, {}).get("properties", {})
        for name, setting in fields.items():
            if name in props:
                cap = int(getattr(settings, setting))
                props[name]["maximum"] = min(cap, props[name].get("maximum", cap))
    eval_bits = schemas.get("EvalRequest", {}).get("properties", {}).get("bits")
    if eval_bits is not None:
        eval_bits["maxItems"] = settings.max_bits_per_eval
    pre = schemas.get("PretrainRequest", {}).get("properties", {})
    if "method" in pre:
        pre["method"]["enum"] = [*sorted(METHODS), None]
    if "backbone" in pre:
        pre["backbone"]["enum"] = [*sorted(BACKBONES), None]
    app.openapi_schema = doc
    return doc


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the database engine and the broker client live for the app's lifetime."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _preload_and_freeze()
        engine = make_async_engine(settings)
        reads = await make_hot_reads(settings, engine)
        app.state.ssql = AppState(
            settings=settings,
            engine=engine,
            celery=make_celery(settings),
            keys=KeyCache(settings.auth_cache_seconds),
            reads=reads,
        )
        keys = app.state.ssql.keys
        reads.watch_revocations(keys.forget, keys.set_listening)
        yield
        await reads.close()
        await engine.dispose()

    app = FastAPI(
        title="SSQL training service",
        version="1",
        description="Quantization-friendly self-supervised pretraining and evaluation at many bit-widths, as jobs.",
        lifespan=lifespan,
        docs_url=None,  # api.web serves /docs from the package's own Swagger UI files (no CDN)
        redoc_url=None,  # ReDoc would load from a CDN
    )
    app.add_exception_handler(FieldError, field_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    for module in (health, catalog, jobs, logs, checkpoints, keys):
        app.include_router(module.router)
    web.install(app)
    app.openapi = lambda: openapi_with_limits(app, settings)  # type: ignore[method-assign]
    return app


app = create_app()
