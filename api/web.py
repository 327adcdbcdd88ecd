"""What the API serves to a browser: the dashboard at ``/`` and Swagger UI at ``/docs``, both from
files shipped in the package (``api/static``): nothing is loaded from a CDN, so both work offline.

Vendored files (``api/static/vendor``, each with its LICENSE): Swagger UI (``swagger-ui-dist``
5.35.0) and uPlot 1.6.32 (the dashboard's charts), copied from the npm registry's packages.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
SWAGGER = "/static/vendor/swagger-ui"

#: the dashboard's page must not be cached across upgrades, nor framed by another site; it runs
#: only its own scripts (the API key lives in the browser's localStorage: no injected or
#: third-party script may run beside it; docs/decisions/015)
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                 "Content-Security-Policy": _CSP}


def install(app: FastAPI) -> None:
    """Mount ``/static``, serve ``/`` (the dashboard) and ``/docs`` (Swagger UI, local assets).
    The app must be created with ``docs_url=None`` so that this ``/docs`` is the only one."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS, media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
