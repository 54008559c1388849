"""Interactive API documentation at ``/docs`` (Swagger UI) and ``/redoc``, served offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they stay blank on machines that
cannot reach one. ``mount_api_docs(app)`` serves the same pages with the JavaScript and CSS
shipped in the ``fastapi-offline`` package, under ``/docs-assets``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def docs_assets_dir() -> Path:
    """Return the directory of the Swagger UI and ReDoc files inside ``fastapi-offline``."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def mount_api_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets; create the app with ``docs_url=None`` and
    ``redoc_url=None`` so FastAPI's CDN pages are not registered as well."""
    app.mount(ASSETS_URL, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=title,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url,
            title=title,
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
