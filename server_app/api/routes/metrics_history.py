"""Per-round metrics history: what the dashboard's accuracy and bytes charts plot."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from server_app import metrics as prom
from server_app.api import problems
from server_app.api.auth import require_read
from server_app.api.deps import db
from server_app.api.queries import round_bytes_many, round_counts_many, small_acc_many
from server_app.api.schemas import RoundMetricsOut
from server_app.registry import crud

router = APIRouter(prefix="/metrics", tags=["metrics"])


@router.get(
    "/rounds",
    summary="Metrics per round",
    description="One row per round, oldest first: large-model accuracy, mean small-model accuracy, reverse-KD "
    "loss, payload bytes up/down and accepted/rejected counts. `last` limits to the newest N rounds.",
    response_model=list[RoundMetricsOut],
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS,
)
def rounds_history(
    s: Annotated[Session, Depends(db)],
    last: Annotated[int, Query(ge=1, le=1000, description="newest N rounds")] = 200,
) -> list[RoundMetricsOut]:
    rounds = list(reversed(crud.list_rounds(s, limit=last, newest_first=True)))
    ids = [r.id for r in rounds]
    counts = round_counts_many(s, ids)
    nbytes = round_bytes_many(s, ids)
    small = small_acc_many(s, ids)
    out = []
    for r in rounds:
        m = dict(r.metrics or {})
        numeric = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        up, down = nbytes[r.id]
        # The orchestrator stores the fleet's byte totals in the round metrics; assignments are the fallback.
        up_m, down_m = prom.pick(numeric, prom.BYTES_UP_KEYS), prom.pick(numeric, prom.BYTES_DOWN_KEYS)
        out.append(
            RoundMetricsOut(
                round_id=r.id,
                state=r.state,
                finished=r.finished,
                large_acc=prom.pick(numeric, prom.LARGE_ACC_KEYS),
                small_acc=_first(prom.pick(numeric, prom.SMALL_ACC_KEYS), small.get(r.id)),
                kd_loss=prom.pick(numeric, prom.KD_LOSS_KEYS),
                bytes_up=int(up_m) if up_m is not None else up,
                bytes_down=int(down_m) if down_m is not None else down,
                accepted=counts[r.id]["accepted"],
                rejected=counts[r.id]["rejected"],
                metrics=numeric,
            )
        )
    return out


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)
