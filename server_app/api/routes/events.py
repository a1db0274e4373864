"""Events: the audit trail (rejections with their reason, revocations, round failures), newest first."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from server_app.api import problems
from server_app.api.auth import require_read
from server_app.api.deps import db
from server_app.api.schemas import EventOut, Page
from server_app.registry import crud

router = APIRouter(prefix="/events", tags=["events"])


@router.get(
    "",
    summary="List events",
    description="Newest first. `kind=rejected` lists refused device messages; `detail.reason` is the contract's "
    "stable reason code (bad_digest, wrong_round, spoofed_device, ...).",
    response_model=Page[EventOut],
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS,
)
def list_events(
    s: Annotated[Session, Depends(db)],
    kind: Annotated[str | None, Query(max_length=64, examples=["rejected"])] = None,
    level: Literal["debug", "info", "warning", "error"] | None = None,
    device_id: Annotated[str | None, Query(max_length=128)] = None,
    round_id: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[EventOut]:
    rows = crud.list_events(s, kind=kind, level=level, device_id=device_id, round_id=round_id, limit=limit, offset=offset)
    return Page[EventOut].of([EventOut.model_validate(e) for e in rows], limit, offset)  # type: ignore[return-value]
