"""Serves the web dashboard (`dashboards/web/`: plain HTML/JS/CSS, no build step) at `/dashboard/`.

Why the server serves it: the operator's machine may be offline (no CDN) and the dashboard must
talk to the same origin as the API (no CORS, no second process). `/` redirects to it.
The directory is found next to the package (a source checkout / editable install) or under
`server_app/static/web` (a wheel that ships it as package data); `KOALA_DASHBOARD_DIR` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "dashboards" / "web",
    Path(__file__).resolve().parents[1] / "static" / "web",
)


def dashboard_dir() -> Path | None:
    env = os.environ.get("KOALA_DASHBOARD_DIR")
    for p in ((Path(env),) if env else ()) + _CANDIDATES:
        if (p / "index.html").is_file():
            return p
    return None


class _NoCacheStatic(StaticFiles):
    """Revalidate on every load (ETag makes that cheap): a server upgrade must never leave a stale app.js."""

    async def get_response(self, path: str, scope: Scope):  # type: ignore[no-untyped-def]
        resp = await super().get_response(path, scope)
        resp.headers.setdefault("Cache-Control", "no-cache")
        return resp


def mount_dashboard(app: FastAPI, directory: Path | None = None) -> bool:
    """Mount the dashboard; returns False (and mounts nothing) when the assets are not present."""
    d = directory or dashboard_dir()
    if d is None:
        return False
    app.mount("/dashboard", _NoCacheStatic(directory=str(d), html=True), name="dashboard")

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    return True
