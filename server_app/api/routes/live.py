"""Live view: one JSON snapshot, and a Server-Sent-Events stream of snapshots and new events.

Why DB polling and not an in-process event bus: the registry is the single source of truth that
every writer (orchestrator thread, ingestion, another server worker, a restarted process)
already updates, so polling it once a second can never miss a change the way a bus fed from one
process could. Each stream sends a `snapshot` only when something changed, new rows of the
event log as `events`, and a comment every 15 s so proxies keep the connection open. A stream
ends after `max_s` seconds (default 25); EventSource (and the dashboard's fetch reader) reconnect on
their own. Why short-lived: uvicorn's graceful shutdown waits for in-flight responses and does not
tell a streaming response it is shutting down, so a long stream would hold a server restart (run
uvicorn with `timeout_graceful_shutdown` as well); it also keeps a forgotten tab from pinning a worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from server_app.api import problems
from server_app.api.auth import require_read
from server_app.api.deps import get_registry
from server_app.api.queries import last_event_id
from server_app.api.routes.devices import _out as device_out
from server_app.api.routes.rounds import round_out
from server_app.api.schemas import EventOut, LiveSnapshot
from server_app.registry import Registry, RegistryUnavailable, crud

router = APIRouter(prefix="/live", tags=["live"])
KEEPALIVE_S = 15.0
MAX_DEVICES = 1000


def build_snapshot(reg: Registry) -> LiveSnapshot:
    with reg.session() as s:
        devices = [device_out(d) for d in crud.list_devices(s, limit=MAX_DEVICES)]
        r = crud.current_round(s)
        current = round_out(r, crud.round_counts(s, r.id)) if r is not None else None
        return LiveSnapshot(
            ts=dt.datetime.now(dt.timezone.utc),
            devices=devices,
            online=sum(d.online for d in devices),
            current_round=current,
            last_event_id=last_event_id(s),
        )


def _events_after(reg: Registry, after: int) -> list[EventOut]:
    with reg.session() as s:
        rows = crud.list_events(s, limit=100)  # newest first; the page is small and indexed
        return [EventOut.model_validate(e) for e in reversed(rows) if e.id > after]


@router.get(
    "/snapshot",
    summary="Live snapshot",
    description="Devices (with online flag), the current round with counts, and the newest event id.",
    response_model=LiveSnapshot,
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS,
)
def snapshot(request: Request) -> LiveSnapshot:
    return build_snapshot(get_registry(request))


def _sse(event: str, data: str, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return head + f"event: {event}\n" + "".join(f"data: {line}\n" for line in data.splitlines()) + "\n"


@router.get(
    "/stream",
    summary="Live stream (Server-Sent Events)",
    description="`text/event-stream`. Events: `snapshot` (a LiveSnapshot, sent on connect and on every change), "
    "`events` (a JSON list of new event-log rows). Reconnect with `Last-Event-ID` to resume the event log.",
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def stream(
    request: Request,
    poll_s: Annotated[float, Query(ge=0.2, le=30.0, description="database poll period")] = 1.0,
    max_s: Annotated[float, Query(ge=1.0, le=3600.0, description="close the stream after this long")] = 25.0,
) -> StreamingResponse:
    reg = get_registry(request)
    try:
        after = int(request.headers.get("last-event-id", "") or -1)
    except ValueError:
        after = -1

    async def gen():  # type: ignore[no-untyped-def]
        nonlocal after
        yield f"retry: 2000\n: koala live stream, poll {poll_s}s\n\n"
        last_key = None
        last_sent = time.monotonic()
        t_end = time.monotonic() + max_s
        while time.monotonic() < t_end and not await request.is_disconnected():
            try:
                snap = await run_in_threadpool(build_snapshot, reg)
                if after < 0:  # a fresh client starts from now, not from the whole history
                    after = snap.last_event_id
                new = await run_in_threadpool(_events_after, reg, after) if snap.last_event_id > after else []
            except RegistryUnavailable:
                yield _sse("error", json.dumps({"detail": "database unavailable"}))
                await asyncio.sleep(poll_s)
                continue
            body = snap.model_dump_json(exclude={"ts"})
            key = hashlib.sha256(body.encode()).hexdigest()
            if key != last_key:
                last_key = key
                last_sent = time.monotonic()
                yield _sse("snapshot", snap.model_dump_json())
            if new:
                after = new[-1].id
                last_sent = time.monotonic()
                yield _sse("events", json.dumps([e.model_dump(mode="json") for e in new]), after)
            if time.monotonic() - last_sent > KEEPALIVE_S:
                last_sent = time.monotonic()
                yield ": keepalive\n\n"
            await asyncio.sleep(poll_s)

    return StreamingResponse(
        gen(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"},
    )
