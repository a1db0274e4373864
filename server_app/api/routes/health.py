"""Liveness and readiness: what a load balancer or systemd watchdog polls."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Broker and database are reachable")
def readyz(request: Request) -> dict[str, object]:
    services = getattr(request.app.state, "services", None)
    checks = services.readiness() if services is not None else {}
    return {"status": "ok" if all(checks.values()) else "degraded", "checks": checks}
