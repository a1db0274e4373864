"""Small registry operations. Each takes a Session and flushes; the caller's unit of work commits.

Run one with its own transaction and outage retry: `registry.run(crud.create_round, strategy=...)`.
Why flush-not-commit: the orchestrator sometimes needs several steps atomically (create a round and
its assignments), and retrying is only correct for a whole transaction (see retry.py).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Table, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from device_firmware_py.contract.messages import ROUND_STATES, TERMINAL_ROUND_STATES

from .errors import Conflict, InvalidTransition, NotFound
from .models import (
    ASSIGNMENT_STATUSES,
    MODEL_KINDS,
    Assignment,
    Device,
    Event,
    Metric,
    ModelVersion,
    Round,
    ServerSetting,
    utcnow,
)

MAX_PAGE = 1000

# Round state machine (states come from the wire contract so monitors and DB agree).
ROUND_TRANSITIONS: dict[str, frozenset[str]] = {
    "created": frozenset({"collecting", "failed", "aborted"}),
    "collecting": frozenset({"aggregating", "failed", "aborted"}),
    "aggregating": frozenset({"completed", "failed", "aborted"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "aborted": frozenset(),
}
assert set(ROUND_TRANSITIONS) == set(ROUND_STATES)
# A result can be claimed (accepted) only while its round has not closed its collection.
CLAIMABLE_ROUND_STATES = ("created", "collecting")


def _page(limit: int, offset: int) -> tuple[int, int]:
    # offset clamped to int64: a huge ?offset= was an OverflowError in the driver -> HTTP 500
    return max(1, min(int(limit), MAX_PAGE)), max(0, min(int(offset), 2**62))


# ---- devices ------------------------------------------------------------------------------------
def get_device(s: Session, device_id: str) -> Device:
    d = s.get(Device, device_id)
    if d is None:
        raise NotFound(f"device {device_id!r}")
    return d


def register_device(
    s: Session, device_id: str, *, arch: str | None = None, credentials_hash: str | None = None
) -> Device:
    """Create a device (provisioning) or update its credentials; un-revokes nothing implicitly."""
    d = s.get(Device, device_id)
    if d is None:
        d = Device(id=device_id, arch=arch, credentials_hash=credentials_hash, status="unknown", revoked=False)
        s.add(d)
    else:
        d.arch = arch or d.arch
        if credentials_hash is not None:
            d.credentials_hash = credentials_hash
    s.flush()
    return d


def upsert_device_status(
    s: Session,
    device_id: str,
    *,
    status: str,
    arch: str | None = None,
    input_shape: Sequence[int] | None = None,
    runtime_version: str | None = None,
    num_samples: int | None = None,
    label_histogram: Sequence[int] | None = None,
    capabilities: dict[str, Any] | None = None,
    seen_at: dt.datetime | None = None,
) -> Device:
    """Record a device's (retained) status message; an offline Last Will keeps the last known facts."""
    d = s.get(Device, device_id)
    if d is None:
        d = Device(id=device_id, status=status, revoked=False)
        s.add(d)
    d.status = status
    d.last_seen = seen_at or utcnow()
    for name, value in (
        ("arch", arch),
        ("input_shape", None if input_shape is None else list(input_shape)),
        ("runtime_version", runtime_version),
        ("num_samples", num_samples),
        ("label_histogram", None if label_histogram is None else list(label_histogram)),
        ("capabilities", capabilities),
    ):
        if value is not None:
            setattr(d, name, value)
    s.flush()
    return d


def upsert_device_status_msg(s: Session, msg: Any) -> Device:
    """Same, from a contract DeviceStatus message."""
    return upsert_device_status(
        s,
        msg.device_id,
        status=msg.state,
        arch=msg.arch,
        input_shape=msg.input_shape,
        runtime_version=msg.runtime_version,
        num_samples=msg.num_samples,
        label_histogram=msg.label_histogram,
        capabilities=msg.capabilities or None,
        seen_at=dt.datetime.fromtimestamp(msg.ts, dt.timezone.utc) if msg.ts else None,
    )


def revoke_device(s: Session, device_id: str, revoked: bool = True) -> Device:
    d = get_device(s, device_id)
    d.revoked = revoked
    s.flush()
    return d


def revoked_device_ids(s: Session) -> list[str]:
    """Every device revoked in the registry (the server keeps them out of rounds from the start)."""
    return list(s.scalars(select(Device.id).where(Device.revoked.is_(True))))


def list_devices(
    s: Session,
    *,
    status: str | None = None,
    arch: str | None = None,
    include_revoked: bool = False,
    limit: int = 100,
    offset: int = 0,
) -> list[Device]:
    limit, offset = _page(limit, offset)
    q = select(Device).order_by(Device.id)
    if status is not None:
        q = q.where(Device.status == status)
    if arch is not None:
        q = q.where(Device.arch == arch)
    if not include_revoked:
        q = q.where(Device.revoked.is_(False))
    return list(s.scalars(q.limit(limit).offset(offset)))




# ---- rounds -------------------------------------------------------------------------------------
def create_round(
    s: Session,
    *,
    strategy: str,
    config: dict[str, Any] | None = None,
    quorum: int = 1,
    participants: Iterable[str] = (),
    deadline: dt.datetime | None = None,
    model_version: int | None = None,
    round_id: int | None = None,
) -> Round:
    """A new round in state `created`; ids are assigned by the database unless given."""
    r = Round(
        strategy=strategy,
        config=dict(config or {}),
        quorum=int(quorum),
        participants=list(participants),
        deadline=deadline,
        model_version=model_version,
        state="created",
        metrics={},
    )
    if round_id is not None:
        r.id = round_id
    s.add(r)
    s.flush()
    return r


def get_round(s: Session, round_id: int) -> Round:
    r = s.get(Round, round_id)
    if r is None:
        raise NotFound(f"round {round_id}")
    return r


def transition_round(
    s: Session,
    round_id: int,
    state: str,
    *,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
    participants: Iterable[str] | None = None,
    deadline: dt.datetime | None = None,
) -> Round:
    """Move a round along the state machine; stamps started/finished. Same-state calls are no-ops
    (idempotent on resume) except that they still merge metrics."""
    r = s.get(Round, round_id, with_for_update=True)
    if r is None:
        raise NotFound(f"round {round_id}")
    if state != r.state and state not in ROUND_TRANSITIONS.get(r.state, frozenset()):
        raise InvalidTransition(f"round {round_id}: {r.state} -> {state} not allowed")
    now = utcnow()
    if state == "collecting" and r.started is None:
        r.started = now
    if state in TERMINAL_ROUND_STATES and r.finished is None:
        r.finished = now
    r.state = state
    if error is not None:
        r.error = error
    if metrics:
        r.metrics = {**(r.metrics or {}), **metrics}  # new dict: JSON columns track reassignment
    if participants is not None:
        r.participants = list(participants)
    if deadline is not None:
        r.deadline = deadline
    s.flush()
    return r


def list_rounds(s: Session, *, state: str | None = None, limit: int = 100, offset: int = 0, newest_first: bool = True) -> list[Round]:
    limit, offset = _page(limit, offset)
    q = select(Round).order_by(Round.id.desc() if newest_first else Round.id)
    if state is not None:
        q = q.where(Round.state == state)
    return list(s.scalars(q.limit(limit).offset(offset)))




def current_round(s: Session) -> Round | None:
    """The newest round that is not finished, else the newest round, else None."""
    r = s.scalars(select(Round).where(Round.state.not_in(TERMINAL_ROUND_STATES)).order_by(Round.id.desc()).limit(1)).first()
    return r or s.scalars(select(Round).order_by(Round.id.desc()).limit(1)).first()


# ---- assignments / submissions --------------------------------------------------------------------
def create_assignment(s: Session, round_id: int, device_id: str, *, bytes_down: int = 0) -> Assignment:
    """Idempotent: re-dispatching after a restart returns the existing row (bytes_down updated)."""
    a = _assignment(s, round_id, device_id)
    if a is None:
        a = Assignment(round_id=round_id, device_id=device_id, status="assigned", bytes_down=bytes_down, bytes_up=0)
        s.add(a)
    else:
        a.bytes_down = bytes_down or a.bytes_down
    s.flush()
    return a


_BULK_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's parameter limits


def _chunks(items: Sequence[str], n: int = _BULK_CHUNK) -> Iterable[Sequence[str]]:
    return (items[i : i + n] for i in range(0, len(items), n))


def _insert_ignoring_existing(s: Session, model: type[Any], rows: list[dict[str, Any]], key: str) -> None:
    """INSERT rows, skipping ones whose `key` already exists (a concurrent writer may have added
    them between our SELECT and this INSERT: presence records devices on another thread)."""
    if not rows:
        return
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        s.execute(sqlite_insert(model).on_conflict_do_nothing(index_elements=[key]), rows)
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        s.execute(pg_insert(model).on_conflict_do_nothing(index_elements=[key]), rows)
    else:  # no portable upsert: plain insert (the SELECT just before makes a clash unlikely)
        s.execute(insert(model), rows)


def create_assignments(s: Session, round_id: int, bytes_down: dict[str, int]) -> None:
    """`register_device` (when unknown) + `create_assignment` for every device of a round dispatch,
    in a few set-based statements instead of ~3 round trips per device (1,000 devices: ~3,000).

    Same outcome as the per-device calls: unknown devices are created `unknown`/not revoked;
    existing assignment rows keep their status (re-dispatch after a restart is idempotent) and get
    `bytes_down` updated when the new value is non-zero.
    """
    ids = sorted(bytes_down)
    known: set[str] = set()
    for chunk in _chunks(ids):
        known.update(s.scalars(select(Device.id).where(Device.id.in_(chunk))))
    _insert_ignoring_existing(
        s, Device, [{"id": d, "status": "unknown", "revoked": False} for d in ids if d not in known], "id"
    )
    existing: dict[str, int] = {}
    for chunk in _chunks(ids):
        q = select(Assignment.device_id, Assignment.id).where(Assignment.round_id == round_id, Assignment.device_id.in_(chunk))
        existing.update((dev, aid) for dev, aid in s.execute(q))
    updates = [{"id": existing[d], "bytes_down": bytes_down[d]} for d in ids if d in existing and bytes_down[d]]
    if updates:
        s.execute(update(Assignment), updates)  # ORM bulk UPDATE by primary key
    new_rows = [
        {"round_id": round_id, "device_id": d, "status": "assigned", "bytes_down": bytes_down[d], "bytes_up": 0}
        for d in ids
        if d not in existing
    ]
    if new_rows:
        s.execute(insert(Assignment), new_rows)  # ORM bulk INSERT (insertmanyvalues batches)
    s.flush()


def _assignment(s: Session, round_id: int, device_id: str) -> Assignment | None:
    return s.scalars(select(Assignment).where(Assignment.round_id == round_id, Assignment.device_id == device_id)).first()


def get_assignment(s: Session, round_id: int, device_id: str) -> Assignment:
    a = _assignment(s, round_id, device_id)
    if a is None:
        raise NotFound(f"assignment of {device_id!r} in round {round_id}")
    return a


@dataclass
class Submission:
    """Outcome of record_submission: `new` counts; `duplicate` (same digest: a QoS 1 redelivery) and
    `conflict` (different digest for an already-submitted slot) must not be counted again."""

    assignment: Assignment
    outcome: str  # "new" | "duplicate" | "conflict"

    @property
    def is_new(self) -> bool:
        return self.outcome == "new"


def record_submission(
    s: Session,
    round_id: int,
    device_id: str,
    *,
    digest: str,
    bytes_up: int,
    late: bool = False,
    metrics: dict[str, Any] | None = None,
) -> Submission:
    """Record that a device's result arrived, exactly once per (round, device).

    Safe under concurrent server workers (shared subscriptions deliver a QoS 1 duplicate to any of
    them): the claim is one conditional UPDATE (atomic on SQLite and PostgreSQL), and when no
    assignment row exists the unique (round_id, device_id) constraint decides who inserts.
    The device and round rows must exist (foreign keys).
    """
    now = utcnow()
    values = {
        "status": "late" if late else "submitted",
        "digest": digest,
        "bytes_up": int(bytes_up),
        "submitted_at": now,
        "metrics": dict(metrics) if metrics else None,
    }
    claimed = cast("CursorResult[Any]", s.execute(  # an UPDATE's result is a CursorResult (rowcount)
        update(Assignment)
        .where(*_claimable(round_id, device_id))
        .values(**values)
        .execution_options(synchronize_session=False)
    ))  # fmt: skip
    if claimed.rowcount == 1:
        mine = get_assignment(s, round_id, device_id)
        s.refresh(mine)
        return Submission(mine, "new")
    a = _assignment(s, round_id, device_id)
    if a is None:  # result from a device that was never assigned (e.g. assignment row lost)
        a = Assignment(round_id=round_id, device_id=device_id, bytes_down=0, **values)
        try:
            with s.begin_nested():
                s.add(a)
            return Submission(a, "new")
        except IntegrityError:
            a = _assignment(s, round_id, device_id)
            if a is None:
                raise Conflict(f"cannot record submission of {device_id!r} for round {round_id} (unknown round or device?)") from None
    s.refresh(a)
    return Submission(a, "duplicate" if a.digest == digest else "conflict")


def _claimable(round_id: int, device_id: str) -> tuple[Any, ...]:
    """The atomic claim's condition: the slot has taken no submission yet."""
    return (
        Assignment.round_id == round_id,
        Assignment.device_id == device_id,
        # "rejected" with no digest = only malformed messages were refused so far: a device's
        # later valid result in the same round must still be taken (was silently swallowed).
        Assignment.status.in_(("assigned", "rejected")),
        Assignment.digest.is_(None),
    )


def _claim_statement() -> Any:
    c = Assignment.__table__.c
    return (
        update(cast(Table, Assignment.__table__))
        .where(c.round_id == bindparam("k_round"), c.device_id == bindparam("k_device"),
               or_(c.status == "assigned", c.status == "rejected"), c.digest.is_(None))  # no IN: executemany
        .values(status="accepted", reason=None, digest=bindparam("k_digest"), bytes_up=bindparam("k_bytes"),
                submitted_at=bindparam("k_now", type_=c.submitted_at.type),
                decided_at=bindparam("k_now", type_=c.decided_at.type),
                metrics=bindparam("k_metrics", type_=c.metrics.type))
    )  # fmt: skip


_CLAIM = _claim_statement()


def claim_accepted(s: Session, rows: Sequence[tuple[int, str, str, int, dict[str, Any] | None]]) -> set[tuple[int, str]]:
    """record_submission's atomic claim + decide_submission("accepted") for many existing rows
    `(round_id, device_id, digest, bytes_up, metrics)`: the same conditional UPDATE (a slot that took
    a submission before — e.g. by another server worker — is not claimed), as one prebuilt
    executemany without ORM objects. Returns the claimed (round, device) keys. When not every row
    was claimed, the savepoint is rolled back and the rows are claimed one by one to learn which."""
    if not rows:
        return set()
    # A round's collection is closed by close_collection (state -> aggregating, row locked). Lock
    # the open rounds first (FOR SHARE: claims of several workers run side by side, a close waits
    # for them and they wait for a close): a claim either commits before the close, so the
    # orchestrator's final read sees it, or sees the round closed and claims nothing. Rounds
    # first, rows second, in every transaction: no deadlock with the close.
    open_rounds = set(s.scalars(select(Round.id).where(Round.id.in_({r for r, *_ in rows}),
                                                         Round.state.in_(CLAIMABLE_ROUND_STATES))
                                .with_for_update(read=True)))  # fmt: skip
    rows = [row for row in rows if row[0] in open_rounds]
    if not rows:
        return set()
    now = utcnow()
    params = [{"k_round": r, "k_device": d, "k_digest": dg, "k_bytes": int(n), "k_now": now,
               "k_metrics": dict(m) if m else None} for r, d, dg, n, m in rows]  # fmt: skip
    conn = s.connection()
    if len(rows) > 1 and conn.dialect.supports_sane_multi_rowcount:
        nested = s.begin_nested()
        if conn.execute(_CLAIM, params).rowcount == len(rows):
            nested.commit()
            return {(r, d) for r, d, *_ in rows}
        nested.rollback()
    return {(r, d) for (r, d, *_), p in zip(rows, params, strict=True) if conn.execute(_CLAIM, p).rowcount == 1}


def decide_submission(s: Session, round_id: int, device_id: str, status: str, *, reason: str | None = None) -> Assignment:
    """Mark a submission accepted/rejected (or an assignment dropped/late) with a reason code."""
    if status not in ASSIGNMENT_STATUSES:
        raise ValueError(f"status {status!r} not in {ASSIGNMENT_STATUSES}")
    a = get_assignment(s, round_id, device_id)
    a.status = status
    a.reason = reason
    a.decided_at = utcnow()
    s.flush()
    return a


def close_collection(s: Session, round_id: int, *, reason: str = "deadline") -> int:
    """End a round's collection: the round moves to `aggregating` (its row locked, so in-flight
    claims of any ingestion worker finish first and later ones see it closed) and the assignments
    still waiting become `dropped`. Returns how many were dropped. After this commits, the round's
    `accepted` rows are final: what the orchestrator reads then is exactly what it aggregates."""
    r = s.get(Round, round_id, with_for_update=True)
    if r is None:
        raise NotFound(f"round {round_id}")
    if r.state == "created":
        transition_round(s, round_id, "collecting")
    if r.state == "collecting":
        transition_round(s, round_id, "aggregating")
    return mark_dropped(s, round_id, reason=reason)


def mark_dropped(s: Session, round_id: int, *, reason: str = "deadline") -> int:
    """Assignments still waiting when the round closes become `dropped`; returns how many."""
    rows = list(s.scalars(select(Assignment).where(Assignment.round_id == round_id, Assignment.status == "assigned")))
    now = utcnow()
    for a in rows:
        a.status, a.reason, a.decided_at = "dropped", reason, now
    s.flush()
    return len(rows)


def round_counts(s: Session, round_id: int) -> dict[str, int]:
    """Per-status assignment counts plus received (= anything that arrived) for RoundStatus messages."""
    rows = s.execute(
        select(Assignment.status, func.count()).where(Assignment.round_id == round_id).group_by(Assignment.status)
    ).all()
    counts = {st: 0 for st in ASSIGNMENT_STATUSES}
    counts.update({st: int(n) for st, n in rows})
    counts["received"] = counts["submitted"] + counts["accepted"] + counts["rejected"] + counts["late"]
    return counts


def list_assignments(
    s: Session,
    *,
    round_id: int | None = None,
    device_id: str | None = None,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Assignment]:
    limit, offset = _page(limit, offset)
    q = select(Assignment).order_by(Assignment.round_id, Assignment.device_id)
    if round_id is not None:
        q = q.where(Assignment.round_id == round_id)
    if device_id is not None:
        q = q.where(Assignment.device_id == device_id)
    if status is not None:
        q = q.where(Assignment.status == status)
    return list(s.scalars(q.limit(limit).offset(offset)))


# ---- events / rejections ------------------------------------------------------------------------
def record_event(
    s: Session,
    kind: str,
    *,
    level: str = "info",
    device_id: str | None = None,
    round_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> Event:
    e = Event(kind=kind, level=level, device_id=(device_id or None) and device_id[:128], round_id=round_id, detail=dict(detail or {}))
    s.add(e)
    s.flush()
    return e


def record_rejection(
    s: Session,
    *,
    reason: str,
    device_id: str | None = None,
    round_id: int | None = None,
    detail: str | dict[str, Any] | None = None,
    topic: str | None = None,
    bytes_up: int | None = None,
) -> Event:
    """A refused message: always an event (kind='rejected'); also marks the (round, device)
    assignment rejected when one exists. Device/round may be unknown or even malformed."""
    info: dict[str, Any] = {"reason": reason}
    if detail is not None:
        info["detail"] = detail if isinstance(detail, dict) else str(detail)[:2000]
    if topic is not None:
        info["topic"] = topic[:256]
    if bytes_up is not None:
        info["bytes"] = int(bytes_up)
    if round_id is not None and device_id is not None:
        a = _assignment(s, round_id, device_id)
        if a is not None and a.status in ("assigned", "submitted", "late"):
            a.status, a.reason, a.decided_at = "rejected", reason, utcnow()
            if bytes_up is not None and not a.bytes_up:
                a.bytes_up = int(bytes_up)
    return record_event(s, "rejected", level="warning", device_id=device_id, round_id=round_id, detail=info)


def list_events(
    s: Session,
    *,
    kind: str | None = None,
    level: str | None = None,
    device_id: str | None = None,
    round_id: int | None = None,
    since: dt.datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Event]:
    """Newest first."""
    limit, offset = _page(limit, offset)
    q = select(Event).order_by(Event.id.desc())
    for col, val in ((Event.kind, kind), (Event.level, level), (Event.device_id, device_id), (Event.round_id, round_id)):
        if val is not None:
            q = q.where(col == val)
    if since is not None:
        q = q.where(Event.ts >= since)
    return list(s.scalars(q.limit(limit).offset(offset)))


# ---- model versions / metrics --------------------------------------------------------------------
def add_model_version(
    s: Session,
    *,
    kind: str,
    arch: str,
    path: str,
    sha256: str,
    nbytes: int,
    round_id: int | None = None,
    metrics: dict[str, Any] | None = None,
    version: int | None = None,
) -> ModelVersion:
    """Register a stored model; version defaults to the next number for (kind, arch)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind {kind!r} not in {MODEL_KINDS}")
    if version is None:
        last = s.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.kind == kind, ModelVersion.arch == arch))
        version = 0 if last is None else int(last) + 1
    mv = ModelVersion(kind=kind, arch=arch, version=version, path=path, sha256=sha256, bytes=nbytes, round_id=round_id, metrics=dict(metrics or {}))
    try:
        with s.begin_nested():
            s.add(mv)
    except IntegrityError:
        raise Conflict(f"model version {kind}/{arch}/{version} already exists") from None
    return mv


def latest_model_version(s: Session, kind: str, arch: str) -> ModelVersion | None:
    q = select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.arch == arch).order_by(ModelVersion.version.desc())
    return s.scalars(q.limit(1)).first()


def list_model_versions(
    s: Session, *, kind: str | None = None, arch: str | None = None, limit: int = 100, offset: int = 0
) -> list[ModelVersion]:
    limit, offset = _page(limit, offset)
    q = select(ModelVersion).order_by(ModelVersion.id.desc())
    if kind is not None:
        q = q.where(ModelVersion.kind == kind)
    if arch is not None:
        q = q.where(ModelVersion.arch == arch)
    return list(s.scalars(q.limit(limit).offset(offset)))


def record_metrics(s: Session, values: dict[str, float], *, round_id: int | None = None) -> list[Metric]:
    """Numeric metrics only (non-numbers and non-finite values are skipped, not stored as junk)."""
    import math

    rows = []
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        rows.append(Metric(round_id=round_id, name=str(name)[:128], value=float(v)))
    s.add_all(rows)
    s.flush()
    return rows




# ---- server settings (operator choices that survive a restart) -----------------------------------

SCHEDULE_POLICY = "schedule_policy"


def get_setting(s: Session, key: str) -> dict[str, Any] | None:
    row = s.get(ServerSetting, key)
    return dict(row.value) if row is not None else None


def put_setting(s: Session, key: str, value: dict[str, Any]) -> None:
    row = s.get(ServerSetting, key)
    if row is None:
        s.add(ServerSetting(key=key, value=dict(value)))
    else:
        row.value = dict(value)
    s.flush()
