"""Read-side aggregates the dashboard needs for many rounds at once (one query, not one per round).

Why here and not in registry.crud: these exist only to shape API pages (counts and byte totals for
a page of rounds); the write-side crud stays small. Pure SELECTs over the registry models.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server_app.registry.models import ASSIGNMENT_STATUSES, Assignment, ModelVersion


def round_counts_many(s: Session, round_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """{round_id: {status: n, ..., received: n}} — same shape as crud.round_counts."""
    ids = list(round_ids)
    out = {rid: {st: 0 for st in ASSIGNMENT_STATUSES} for rid in ids}
    if ids:
        rows = s.execute(
            select(Assignment.round_id, Assignment.status, func.count())
            .where(Assignment.round_id.in_(ids))
            .group_by(Assignment.round_id, Assignment.status)
        ).all()
        for rid, st, n in rows:
            out[int(rid)][str(st)] = int(n)
    for c in out.values():
        c["received"] = c["submitted"] + c["accepted"] + c["rejected"] + c["late"]
    return out


def round_bytes_many(s: Session, round_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """{round_id: (bytes_up, bytes_down)} summed over the round's assignments."""
    ids = list(round_ids)
    out = {rid: (0, 0) for rid in ids}
    if ids:
        rows = s.execute(
            select(Assignment.round_id, func.sum(Assignment.bytes_up), func.sum(Assignment.bytes_down))
            .where(Assignment.round_id.in_(ids))
            .group_by(Assignment.round_id)
        ).all()
        for rid, up, down in rows:
            out[int(rid)] = (int(up or 0), int(down or 0))
    return out


def last_event_id(s: Session) -> int:
    from server_app.registry.models import Event

    return int(s.scalar(select(func.max(Event.id))) or 0)


def find_model_version(s: Session, kind: str, arch: str, version: int) -> ModelVersion | None:
    q = select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.arch == arch, ModelVersion.version == version)
    return s.scalars(q).first()


def small_acc_many(s: Session, round_ids: Iterable[int]) -> dict[int, float]:
    """{round_id: mean small-model test accuracy} over accepted submissions that report `test_acc`.

    Why: devices report their own small model's accuracy in the result metrics; the round row only
    has what the server computed, so the dashboard's "small model" line comes from here.
    """
    ids = list(round_ids)
    acc: dict[int, list[float]] = {}
    if ids:
        rows = s.execute(
            select(Assignment.round_id, Assignment.metrics).where(
                Assignment.round_id.in_(ids), Assignment.status == "accepted"
            )
        ).all()
        for rid, m in rows:
            v = (m or {}).get("test_acc")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                acc.setdefault(int(rid), []).append(float(v))
    return {rid: sum(v) / len(v) for rid, v in acc.items()}
