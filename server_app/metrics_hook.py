"""One way for the round, ingestion and transport code to report to Prometheus.

Why a module of its own: `server_app.metrics` imports prometheus-client at load, and a metrics
call must never break the work that reports it (a round, an ingested result, an MQTT delivery).
Each caller used to wrap its own import in try/except; they now call `record`.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def record(name: str, *args: Any, **kw: Any) -> None:
    """Call server_app.metrics.<name>(*args, **kw); a missing prometheus-client or a failing call
    is logged at debug level and otherwise ignored."""
    try:
        from server_app import metrics

        getattr(metrics, name)(*args, **kw)
    except Exception:
        log.debug("metrics call failed name=%s", name, exc_info=True)
