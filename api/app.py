"""The FastAPI application: ``uvicorn api.app:app`` (or ``ssql up``)."""

from __future__ import annotations

import gc
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from api import web
from api.errors import (
    OUTAGE_EXCEPTIONS,
    SERVICE_UNAVAILABLE_RESPONSE,
    FieldError,
    field_error_handler,
    outage_handler,
    request_validation_handler,
    unprocessable,
)
from api.head import HeadAsGet
from api.limits import BodySizeLimit
from api.metrics import RequestMetrics
from api.redact import redact, set_roots
from api.routes import (
    catalog,
    checkpoints,
    compare,
    datasets,
    health,
    jobs,
    keys,
    lineage,
    logs,
    service,
    usage,
)
from api.schemas import INTEGER_RULE
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
    "FinetuneRequest": {"epochs": "max_epochs", "batch_size": "max_batch_size"},
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


def _allowed_methods(app: FastAPI, path: str) -> set[str]:
    """The methods the OpenAPI document states for ``path`` (templates like ``/v1/jobs/{job_id}``)."""
    table = getattr(app.state, "allow_table", None)
    if table is None:
        table = []
        for template, ops in app.openapi().get("paths", {}).items():
            regex = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
            methods = {m.upper() for m in ops if m in ("get", "put", "post", "delete", "patch", "options", "head", "trace")}
            table.append((re.compile(regex), methods | ({"HEAD"} if "GET" in methods else set())))
        app.state.allow_table = table
    return {m for regex, methods in table if regex.match(path) for m in methods}


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's HTTP error answer, except: a 405's ``Allow`` lists every method the schema
    states for the path (Starlette names only those of the first route it tried: ``OPTIONS
    /v1/jobs`` said ``Allow: POST`` though ``GET /v1/jobs`` exists), and a body that cannot be
    parsed at all (not UTF-8) is the 422 of a bad body, like invalid JSON, not an undocumented 400."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405 and (methods := _allowed_methods(request.app, request.url.path)):
        exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(sorted(methods))})
    elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return unprocessable(("body",), "the body is not valid JSON (UTF-8)")
    if isinstance(exc.detail, str) and "/" in exc.detail:  # no server path in an answer (decision 014)
        exc = StarletteHTTPException(exc.status_code, redact(exc.detail), headers=exc.headers)
    return await http_exception_handler(request, exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the database engine and the broker client live for the app's lifetime."""
    settings = settings or get_settings()
    set_roots({"<data_root>": settings.resolved_data_root(), "<artifacts>": settings.resolved_artifacts_dir(),
               "<home>": settings.resolved_home()})

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
        description="Quantization-friendly self-supervised pretraining and evaluation at many bit-widths, as jobs. "
        f"Request bodies are UTF-8 JSON; {INTEGER_RULE}. Every operation that reads the database answers 503 "
        "with `Retry-After` while the database is unreachable.",
        lifespan=lifespan,
        docs_url=None,  # api.web serves /docs from the package's own Swagger UI files (no CDN)
        redoc_url=None,  # ReDoc would load from a CDN
    )
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(FieldError, field_error_handler)
    app.add_exception_handler(RequestValidationError, request_validation_handler)
    for exc_class in OUTAGE_EXCEPTIONS:  # database (or another backend) away: 503 + Retry-After, not a 500
        app.add_exception_handler(exc_class, outage_handler)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       uploads={("POST", "/v1/datasets"): (settings.max_upload_bytes, "SSQL_MAX_UPLOAD_BYTES")})
    app.add_middleware(RequestMetrics)  # counts and times every answer, 413s included (GET /metrics)
    app.add_middleware(HeadAsGet)  # HEAD wherever GET: same status and headers, no body
    for module in (health, catalog, jobs, lineage, compare, datasets, logs, checkpoints, keys, usage, service):
        reads_db = module not in (health, catalog)  # /readyz states its own 503
        app.include_router(module.router, responses=SERVICE_UNAVAILABLE_RESPONSE if reads_db else None)
    web.install(app)
    app.openapi = lambda: openapi_with_limits(app, settings)  # type: ignore[method-assign]
    return app


app = create_app()
