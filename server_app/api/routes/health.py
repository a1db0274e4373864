"""Liveness and readiness: what a load balancer or systemd watchdog polls."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Broker and database are reachable",
            description="200 with status ok when every check passes, 503 with status degraded otherwise "
                        "(what the compose healthcheck, a load balancer or a systemd watchdog test).")  # fmt: skip
def readyz(request: Request, response: Response) -> dict[str, object]:
    services = getattr(request.app.state, "services", None)
    checks = services.readiness() if services is not None else {}
    ok = all(checks.values())
    if not ok:
        response.status_code = 503
    return {"status": "ok" if ok else "degraded", "checks": checks}
