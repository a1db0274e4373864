"""Rounds: history and detail from the registry; start / stop / schedule through the orchestrator."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response
from sqlalchemy.orm import Session

from server_app.api import problems
from server_app.api.auth import require_read, require_write
from server_app.api.deps import RoundControl, db, get_registry, orchestrator
from server_app.api.queries import round_counts_many
from server_app.api.schemas import (
    EventOut,
    Page,
    RoundCounts,
    RoundDetail,
    RoundOut,
    RoundStartRequest,
    RoundStartResponse,
    RoundStopRequest,
    RoundStopResponse,
    SchedulePolicy,
    SchedulePolicyUpdate,
    SubmissionOut,
)
from server_app.registry import crud
from server_app.registry.models import Round

router = APIRouter(prefix="/rounds", tags=["rounds"])
RoundId = Annotated[int, Path(ge=0, le=2**31 - 1, description="round id", examples=[3])]
RoundState = Literal["created", "collecting", "aggregating", "completed", "failed", "aborted"]


def round_out(r: Round, counts: dict[str, int], cls: type[RoundOut] = RoundOut, **extra: Any) -> RoundOut:
    data = {c: getattr(r, c) for c in cls.model_fields if hasattr(r, c)}
    data.update(counts=RoundCounts(**counts), participants=list(r.participants or []), metrics=dict(r.metrics or {}), **extra)
    return cls.model_validate(data)


@router.get(
    "",
    summary="List rounds",
    description="Rounds, newest first, with per-status submission counts. Filter by `state`.",
    response_model=Page[RoundOut],
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS,
)
def list_rounds(
    s: Annotated[Session, Depends(db)],
    state: RoundState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[RoundOut]:
    rows = crud.list_rounds(s, state=state, limit=limit, offset=offset)
    counts = round_counts_many(s, [r.id for r in rows])
    return Page[RoundOut].of([round_out(r, counts[r.id]) for r in rows], limit, offset)  # type: ignore[return-value]


@router.get(
    "/current",
    summary="Current round",
    description="The newest unfinished round, else the newest round. 404 when no round ever ran.",
    response_model=RoundOut,
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, **problems.NOT_FOUND},
)
def current_round(s: Annotated[Session, Depends(db)]) -> RoundOut:
    r = crud.current_round(s)
    if r is None:
        raise HTTPException(404, detail="no round has run yet")
    return round_out(r, crud.round_counts(s, r.id))


@router.get(
    "/schedule",
    summary="Get the schedule policy",
    description="When the orchestrator runs rounds on its own (auto, rounds, min_devices, interval_s).",
    response_model=SchedulePolicy,
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, **problems.UNAVAILABLE},
)
def get_schedule(orch: Annotated[RoundControl, Depends(orchestrator)]) -> SchedulePolicy:
    return SchedulePolicy.model_validate(_call(orch, "schedule_policy"))


@router.put(
    "/schedule",
    summary="Change the schedule policy",
    description="Only the fields given change; e.g. `{\"auto\": false}` pauses automatic rounds "
    "(POST /rounds/start still runs one). The resulting policy is stored in the registry and applied again "
    "when the server restarts.",
    response_model=SchedulePolicy,
    dependencies=[Depends(require_write)],
    responses={**problems.WRITE_ERRORS, **problems.UNAVAILABLE},
)
def put_schedule(
    policy: SchedulePolicyUpdate,
    orch: Annotated[RoundControl, Depends(orchestrator)],
    request: Request,
) -> SchedulePolicy:
    out = SchedulePolicy.model_validate(_call(orch, "set_schedule_policy", policy.model_dump(exclude_none=True)))
    # its own short write transaction, retried as a whole: under SQLite a request session that read
    # first cannot upgrade to a write while the orchestrator commits ("database is locked")
    get_registry(request).run(crud.put_setting, crud.SCHEDULE_POLICY, out.model_dump(mode="json"))
    return out


@router.post(
    "/start",
    summary="Start a round now",
    description="Asks the orchestrator to run one more round now. Returns 202 with the round id; follow it on "
    "`/rounds/{id}`, `/rounds/current` or the live stream. 409 when a round is running or no device is online.",
    status_code=202,
    response_model=RoundStartResponse,
    dependencies=[Depends(require_write)],
    responses={**problems.WRITE_ERRORS, **problems.CONFLICT, **problems.UNAVAILABLE},
)
def start_round(
    request: Request,
    response: Response,
    orch: Annotated[RoundControl, Depends(orchestrator)],
    s: Annotated[Session, Depends(db)],
    body: Annotated[RoundStartRequest | None, Body()] = None,
) -> RoundStartResponse:
    rid = _call(orch, "start_round")
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) else None
    crud.record_event(s, "round_start_requested", round_id=rid, detail={"reason": body.reason} if body and body.reason else {})
    if rid is not None:
        response.headers["Location"] = str(request.url_for("get_round", round_id=rid))
    return RoundStartResponse(round_id=rid, detail=f"round {rid} starting" if rid is not None else "round starting")


@router.post(
    "/stop",
    summary="Stop the running round",
    description="Aborts the round being collected or aggregated; it ends in state `aborted` and no result of it "
    "is folded into the large model.",
    response_model=RoundStopResponse,
    dependencies=[Depends(require_write)],
    responses={**problems.WRITE_ERRORS, **problems.CONFLICT, **problems.UNAVAILABLE},
)
def stop_round(
    orch: Annotated[RoundControl, Depends(orchestrator)],
    s: Annotated[Session, Depends(db)],
    body: Annotated[RoundStopRequest | None, Body()] = None,
) -> RoundStopResponse:
    reason = body.reason if body else "stopped by operator"
    rid = _call(orch, "stop_round", None, reason)
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) else None
    crud.record_event(s, "round_stop_requested", level="warning", round_id=rid, detail={"reason": reason})
    return RoundStopResponse(round_id=rid, stopped=True, detail=f"round {rid} stopping" if rid is not None else "stopping")


@router.get(
    "/{round_id}",
    name="get_round",
    summary="Round detail",
    description="State, timings, metrics, every participant's submission (status, reason, bytes) and the "
    "round's rejection events.",
    response_model=RoundDetail,
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, **problems.NOT_FOUND},
)
def get_round(round_id: RoundId, s: Annotated[Session, Depends(db)]) -> RoundOut:
    r = crud.get_round(s, round_id)
    subs = crud.list_assignments(s, round_id=round_id, limit=1000)
    rejections = crud.list_events(s, kind="rejected", round_id=round_id, limit=200)
    return round_out(
        r,
        crud.round_counts(s, round_id),
        RoundDetail,
        config=dict(r.config or {}),
        submissions=[SubmissionOut.model_validate(a) for a in subs],
        rejections=[EventOut.model_validate(e) for e in rejections],
    )


def _call(orch: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call an orchestrator operation; its RuntimeError (already running, nothing to stop, ...) is a 409."""
    fn = getattr(orch, method, None)
    if fn is None:
        raise HTTPException(503, detail=f"the orchestrator does not support {method}")
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise HTTPException(409 if isinstance(exc, RuntimeError) else 422, detail=str(exc)) from exc
