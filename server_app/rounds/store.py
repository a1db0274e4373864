"""RegistryStore (round, assignment and submission rows on the registry; accepted payloads on
disk) and StrategyCheckpoint (a strategy's public state, saved atomically per model version).

Used by the MQTT fleet, the ingestor and the orchestrator; nothing here knows KD math or MQTT.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from device_firmware_py.contract import messages as cm
from device_firmware_py.fileio import atomic_write
from server_app import submission_log
from server_app.engine.strategy import Strategy
from server_app.engine.types import Result
from server_app.registry import crud
from server_app.registry.errors import InvalidTransition
from server_app.registry.models import Assignment
from server_app.registry.session import Registry
from server_app.rounds.collection import Collection

log = logging.getLogger("koala.store")


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


# ------------------------------------------------------------------------------------- registry
class RegistryStore:
    """Round/assignment/submission persistence for MqttFleet and Ingestor, on registry crud.

    Accepted result payloads are also kept on disk (`submissions/r{n}/seg-*.seg`, one fsync'd
    segment per ingested batch, written before the DB rows say `accepted`; see
    server_app/submission_log.py), so a resumed round can rebuild its results.
    """

    def __init__(self, registry: Registry, data_dir: str | Path):
        self.reg = registry
        self.data_dir = Path(data_dir)

    # -- rounds
    def ensure_round(self, round_id: int, strategy: str, config: dict[str, Any], model_version: int) -> str:
        """Create round n (state created) unless it exists; returns its state."""

        def fn(s: Session) -> str:
            r = s.get(crud.Round, round_id)
            if r is None:
                r = crud.create_round(s, strategy=strategy, config=config, round_id=round_id, model_version=model_version)
            return r.state

        return self.reg.run(fn)

    def transition(self, round_id: int, state: str, **kw: Any) -> None:
        try:
            self.reg.run(crud.transition_round, round_id, state, **kw)
        except InvalidTransition as exc:  # e.g. resumed round already past this state: keep going
            log.warning("round transition refused round=%d state=%s error=%s", round_id, state, exc)

    def round_state(self, round_id: int) -> str | None:
        return self.reg.run(lambda s: getattr(s.get(crud.Round, round_id), "state", None))

    def last_round(self) -> tuple[int, str] | None:
        r = self.reg.run(crud.current_round)
        return None if r is None else (int(r.id), str(r.state))

    def counts(self, round_id: int) -> dict[str, int]:
        return self.reg.run(crud.round_counts, round_id)

    # -- RoundStore (fleet)
    def assignments_sent(self, round_id: int, sent: dict[str, int], deadline: float) -> None:
        def fn(s: Session) -> None:
            crud.create_assignments(s, round_id, sent)  # set-based: a few statements, not 3 per device
            r = crud.get_round(s, round_id)
            # collecting from here (before the first frame goes out), so the registry says so to
            # every ingestion worker by the time a fast device answers
            state = "collecting" if r.state == "created" else r.state
            crud.transition_round(s, round_id, state, participants=sorted(set(r.participants or []) | set(sent)),
                                  deadline=_utc(deadline))  # fmt: skip

        self.reg.run(fn)

    def accepted_results(self, round_id: int) -> dict[str, Result]:
        """The round's accepted results rebuilt from disk: a record counts only when its row is
        `accepted` with the same digest (submission_log.recover)."""
        rows = self.reg.run(crud.list_assignments, round_id=round_id, status="accepted", limit=crud.MAX_PAGE)
        accepted = {a.device_id: a.digest for a in rows}
        found = submission_log.recover(self.data_dir, round_id, accepted)
        for dev in sorted(set(accepted) - set(found)):
            log.error("accepted result missing on disk round=%d device=%s", round_id, dev)
        return dict(found)

    def close_collection(self, round_id: int, missing: list[str]) -> None:
        """Close the round in the registry (-> aggregating, waiting rows -> dropped): from here on no
        ingestion worker can accept a result of it (crud.claim_accepted checks the round)."""
        n = self.reg.run(crud.close_collection, round_id, reason="deadline")
        if n:
            log.info("dropped round=%d devices=%d", round_id, n)

    def accepted_digests(self, round_id: int, known: int = -1) -> dict[str, str | None] | None:
        """{device: digest} of the round's accepted rows; None (one COUNT, no rows) when their
        number is still `known`: the orchestrator polls this while a round collects."""

        def fn(s: Session) -> dict[str, str | None] | None:
            where = (Assignment.round_id == round_id, Assignment.status == "accepted")
            if known >= 0 and s.scalar(select(func.count()).select_from(Assignment).where(*where)) == known:
                return None
            return {d: dg for d, dg in s.execute(select(Assignment.device_id, Assignment.digest).where(*where))}

        return self.reg.run(fn)

    def segment_index(self, round_id: int) -> submission_log.SegmentIndex:
        return submission_log.SegmentIndex(self.data_dir, round_id)

    # -- what ingestion workers read to judge a round's results (server_app.rounds.follower)
    def _collection_path(self, round_id: int) -> Path:
        return submission_log.round_dir(self.data_dir, round_id) / "collection.json"

    def save_collection(self, col: Collection) -> None:
        """Written (atomically) before the assignments go out, next to the round's segments."""
        path = self._collection_path(col.round_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(col.to_json()).encode())

    def collection_stamp(self, round_id: int) -> int | None:
        """Changes when the round's expectations are rewritten (a restarted orchestrator)."""
        try:
            return self._collection_path(round_id).stat().st_mtime_ns
        except OSError:
            return None

    def load_collection(self, round_id: int) -> Collection | None:
        path = self._collection_path(round_id)
        try:
            return Collection.from_json(json.loads(path.read_bytes()), keep_results=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("collection of round %d unreadable (%s): %s", round_id, path, exc)
            return None

    def open_round(self) -> tuple[int, str, float | None] | None:
        """(id, state, deadline as unix time) of the newest round, for ingestion workers."""

        def fn(s: Session) -> tuple[int, str, float | None] | None:
            r = crud.current_round(s)
            if r is None:
                return None
            dl = r.deadline
            if dl is not None and dl.tzinfo is None:
                dl = dl.replace(tzinfo=dt.timezone.utc)
            return int(r.id), str(r.state), None if dl is None else dl.timestamp()

        return self.reg.run(fn)

    def revoked_devices(self) -> list[str]:
        return list(self.reg.run(crud.revoked_device_ids))

    def collection_closed(self, round_id: int) -> bool:
        return self.round_state(round_id) == "aggregating"

    # -- IngestStore (ingest)
    def submission(self, round_id: int, device_id: str) -> tuple[str, str | None] | None:
        def fn(s: Session) -> tuple[str, str | None] | None:
            a = crud._assignment(s, round_id, device_id)
            return None if a is None else (a.status, a.digest)

        return self.reg.run(fn)

    def submissions(self, keys: Iterable[tuple[int, str]]) -> dict[tuple[int, str], tuple[str, str | None]]:
        """(status, digest) of every existing (round, device) row among `keys`, in one SELECT."""
        keys = set(keys)
        if not keys:
            return {}
        rounds, devices = {r for r, _ in keys}, {d for _, d in keys}

        def fn(s: Session) -> dict[tuple[int, str], tuple[str, str | None]]:
            q = select(Assignment.round_id, Assignment.device_id, Assignment.status, Assignment.digest).where(
                Assignment.round_id.in_(rounds), Assignment.device_id.in_(devices))
            return {(r, d): (st, dg) for r, d, st, dg in s.execute(q) if (r, d) in keys}

        return self.reg.run(fn)

    def commit(self, ops: list[Any]) -> set[tuple[int, str]]:
        """Write one ingested batch: the accepted payloads durably to disk (one segment per round,
        fsync'd), then ONE transaction applying `ops` in order (ingest.AcceptOp / MarkOp /
        RejectOp). Returns the (round, device) keys whose accept claimed its row; an accept that did
        not (another server worker took it first) is a duplicate. Raises RegistryUnavailable with
        nothing committed — the caller retries the whole batch (a retry writes a new segment; the
        unused copy is ignored on recovery)."""
        from server_app.ingest import AcceptOp, MarkOp, RejectOp

        frames: dict[int, list[bytes]] = {}
        for op in ops:
            if isinstance(op, AcceptOp):
                frames.setdefault(op.round_id, []).append(op.payload)
        for rnd, fs in frames.items():
            submission_log.write_segment(self.data_dir, rnd, fs)

        def fn(s: Session) -> set[tuple[int, str]]:
            # marks and events first, then the accepts in one statement: a `rejected` mark never
            # touches an accepted row and an accept may claim a `rejected` one, so the order of a
            # device's messages within the batch does not change the result
            for op in ops:
                if isinstance(op, MarkOp):
                    _mark(s, op.round_id, op.device_id, op.status, op.reason, op.nbytes, op.digest)
                elif isinstance(op, RejectOp):
                    crud.record_event(s, "rejected", level="warning", device_id=op.device_id, round_id=op.round_id,
                                      detail={"reason": op.reason, "detail": op.detail[:2000]})  # fmt: skip
            return crud.claim_accepted(s, [(op.round_id, op.device_id, op.digest, len(op.payload), op.metrics)
                                           for op in ops if isinstance(op, AcceptOp)])  # fmt: skip

        return self.reg.run(fn)

    def device_status(self, status: cm.DeviceStatus) -> None:
        self.reg.run(crud.upsert_device_status_msg, status)

    def device_statuses(self, statuses: list[cm.DeviceStatus]) -> None:
        """Several devices' newest status in one transaction (server_app.status_writer)."""

        def fn(s: Session) -> None:
            for st in statuses:
                crud.upsert_device_status_msg(s, st)

        self.reg.run(fn)

    def over_budget_events(self, rows: list[tuple[str, dict[str, int]]], window_s: float) -> None:
        """One `over_budget` event per flooding device and window (server_app.ingest_budget)."""

        def fn(s: Session) -> None:
            for dev, dropped in rows:
                crud.record_event(s, "rejected", level="warning", device_id=dev,
                                  detail={"reason": "over_budget", "dropped": dropped, "window_s": window_s})  # fmt: skip

        self.reg.run(fn)

    # -- models
    def add_model(self, kind: str, arch: str, path: Path, version: int, round_id: int | None, metrics: dict[str, Any]) -> None:
        data = path.read_bytes()
        self.reg.run(crud.add_model_version, kind=kind, arch=arch, path=str(path), sha256=hashlib.sha256(data).hexdigest(),
                     nbytes=len(data), round_id=round_id, metrics=metrics, version=version)  # fmt: skip

    def latest_model(self, kind: str, arch: str) -> tuple[int, Path, int | None] | None:
        """(version, path, round that produced it) of the newest registered model."""
        mv = self.reg.run(crud.latest_model_version, kind, arch)
        return None if mv is None else (int(mv.version), Path(mv.path), mv.round_id)

    def event(self, kind: str, **kw: Any) -> None:
        self.reg.run(crud.record_event, kind, **kw)

    def record_metrics(self, round_id: int, metrics: dict[str, Any]) -> None:
        self.reg.run(crud.record_metrics, metrics, round_id=round_id)


def _mark(s: Session, round_id: int, device_id: str, status: str, reason: str | None, nbytes: int, digest: str | None) -> None:
    if status == "late" and digest is not None:
        sub = crud.record_submission(s, round_id, device_id, digest=digest, bytes_up=nbytes, late=True)
        if sub.is_new or sub.assignment.status == "dropped":
            crud.decide_submission(s, round_id, device_id, "late", reason=reason)
    elif (a := crud._assignment(s, round_id, device_id)) is not None and a.status not in ("accepted", "late"):
        # a malformed message after the device's accepted result must not un-accept it
        crud.decide_submission(s, round_id, device_id, status, reason=reason)


# ------------------------------------------------------------------------------ strategy state
class StrategyCheckpoint:
    """Saves/restores a Strategy's public state (`state_dict` / `load_state`), atomically."""

    def __init__(self, models_dir: str | Path):
        self.dir = Path(models_dir)

    def save(self, strategy: Strategy, version: int) -> Path:
        import torch

        buf = io.BytesIO()
        state = strategy.state_dict()
        state["version"] = version
        torch.save(state, buf)
        path = self.dir / f"strategy_v{version:05d}.pt"
        atomic_write(path, buf.getvalue())
        return path

    def load(self, strategy: Strategy, path: Path) -> int:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False)
        strategy.load_state(state)
        return int(state["version"])


