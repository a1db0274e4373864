"""`/docs` (Swagger UI) and `/redoc` served from vendored assets, so they work offline.

FastAPI's defaults load Swagger UI and ReDoc from a CDN (and ReDoc fonts from Google), which an
operator's box or a factory network often cannot reach: the page stays blank. The assets live in
`server_app/static/docs/` (versions and licenses in its README.md) and are served at
`/static/docs/`; the HTML pages reference nothing outside this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parents[1] / "static" / "docs"
PREFIX = "/static/docs"


def mount_docs(app: FastAPI) -> bool:
    """Add /docs and /redoc (the app must be built with docs_url=None, redoc_url=None). Returns
    False (no docs pages) when the assets are missing from the install."""
    if not (ASSETS / "swagger-ui-bundle.js").is_file():
        return False
    app.mount(PREFIX, StaticFiles(directory=str(ASSETS)), name="docs-assets")
    title = app.title
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def _swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{title} - Swagger UI",
            swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js", swagger_css_url=f"{PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{PREFIX}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io
        )  # fmt: skip

    @app.get("/redoc", include_in_schema=False)
    def _redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url, title=f"{title} - ReDoc", redoc_js_url=f"{PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{PREFIX}/favicon-32x32.png", with_google_fonts=False,
        )  # fmt: skip

    return True
