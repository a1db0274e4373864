"""FastAPI dependencies: the registry session and the round controller, taken from app.state.services.

Why through `app.state.services` and not module globals: each app (test, CLI, embedded demo) is
built around its own `ServerServices`, so two apps in one process never share a database.

What the API expects from `services` (duck-typed, see `ApiServices`):
  registry      server_app.registry.Registry            (required for every data route)
  orchestrator  an object implementing `RoundControl`   (optional; start/stop/schedule need it)
  settings      server_app.config.Settings              (optional; API token, open_reads_localhost)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from fastapi import HTTPException, Request
from sqlalchemy.orm import Session

from server_app.registry import Registry


@runtime_checkable
class RoundControl(Protocol):
    """The orchestrator operations the API calls (server_app.rounds.orchestrator.RoundOrchestrator).

    start_round: run one more round now; returns its id. Raises ``RuntimeError`` (-> 409) when a
        round is already running or no device is online.
    stop_round: abort a running round (it ends in state ``aborted``); ``round_id`` None = current.
        Raises ``RuntimeError`` (-> 409) when nothing is running.
    schedule_policy / set_schedule_policy: the automatic-round policy as a plain dict
        {auto, rounds, min_devices, interval_s}; ``ValueError`` (-> 422) for unknown keys.
    """

    def start_round(self, **overrides: Any) -> int: ...
    def stop_round(self, round_id: int | None = None, reason: str = "stopped by operator") -> Any: ...
    def schedule_policy(self) -> dict[str, Any]: ...
    def set_schedule_policy(self, policy: dict[str, Any]) -> dict[str, Any]: ...


class ApiServices(Protocol):
    registry: Registry


def services(request: Request) -> Any:
    svc = getattr(request.app.state, "services", None)
    if svc is None:
        raise HTTPException(503, detail="server services are not configured")
    return svc


def get_registry(request: Request) -> Registry:
    reg = getattr(services(request), "registry", None)
    if reg is None:
        raise HTTPException(503, detail="registry is not configured")
    return reg


def db(request: Request) -> Iterator[Session]:
    """One unit of work per request: commit on success, rollback on error."""
    with get_registry(request).session() as s:
        yield s


def orchestrator(request: Request) -> RoundControl:
    orch = getattr(services(request), "orchestrator", None)
    if orch is None:
        raise HTTPException(503, detail="orchestrator not running: rounds cannot be started or stopped")
    return orch
