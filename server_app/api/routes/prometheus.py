"""`GET /metrics`: Prometheus text exposition (mounted at the root, not under /api/v1).

Open without a token, like most exporters: it carries counts and gauges, no device data. Put it
behind the network's scrape ACL (or a reverse proxy) where that matters.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server_app import metrics
from server_app.registry import RegistryUnavailable

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})  # fmt: skip
def prometheus_metrics(request: Request) -> Response:
    services = getattr(request.app.state, "services", None)
    reg = getattr(services, "registry", None)
    if reg is not None:
        try:
            with reg.session() as s:
                metrics.refresh_from_registry(s)
        except RegistryUnavailable:
            pass  # serve the process-side metrics anyway; the DB gauges keep their last values
    counts = getattr(getattr(services, "ingestor", None), "counts", None)
    budget = getattr(services, "budget", None)
    dog = getattr(services, "intake_watchdog", None)
    text = metrics.render(counts, dropped=budget.dropped_snapshot() if budget is not None else None,
                          stalls=getattr(dog, "stalls", 0), recoveries=getattr(dog, "recoveries", 0))  # fmt: skip
    return Response(text, media_type=metrics.CONTENT_TYPE_LATEST)
