"""The FastAPI application: ``uvicorn api.app:app`` (or ``ssql up``)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from api.errors import FieldError, field_error_handler, request_validation_handler
from api.limits import BodySizeLimit
from api.routes import catalog, checkpoints, health, jobs, keys
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
    )
    app.add_exception_handler(FieldError, field_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    for module in (health, catalog, jobs, checkpoints, keys):
        app.include_router(module.router)
    return app


app = create_app()
