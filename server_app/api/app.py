"""FastAPI app factory.

The app owns no global state: `create_app(services)` receives a `ServerServices` container
(database, MQTT client, orchestrator) whose start/stop run in the lifespan, so tests can build
an app around real services on private ports and the CLI can build one from Settings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import APIRouter, FastAPI

from server_app import __version__
from server_app.api.docs import mount_docs
from server_app.api.problems import install_problem_handlers
from server_app.api.routes import health, prometheus
from server_app.api.static import mount_dashboard


class Services(Protocol):
    """What the app needs from the server's runtime (see server_app.services.ServerServices)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def readiness(self) -> dict[str, bool]: ...


def _api_routers() -> list[APIRouter]:
    """Routers mounted under /api/v1. Every one must import: a missing or broken route module is a
    broken install and fails the app's construction loudly (it used to be skipped silently)."""
    from server_app.api.routes import devices, events, live, metrics_history, models, predict, rounds

    return [m.router for m in (devices, rounds, models, predict, metrics_history, events, live)]


def create_app(services: Services | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            services.start()
        try:
            yield
        finally:
            if services is not None:
                services.stop()

    app = FastAPI(
        title="KOALA Edge server",
        version=__version__,
        description="Registry, rounds and models of a KOALA federated-distillation fleet.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc from vendored assets (server_app.api.docs): they work offline
        redoc_url=None,
    )
    app.state.services = services
    install_problem_handlers(app)
    app.include_router(health.router)
    app.include_router(prometheus.router)
    for router in _api_routers():
        app.include_router(router, prefix="/api/v1")
    mount_docs(app)
    mount_dashboard(app)
    return app
