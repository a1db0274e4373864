"""Registry CRUD and migrations on SQLite and on the real PostgreSQL (fixture `registry` runs both)."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import inspect

from server_app.registry import (
    InvalidTransition,
    NotFound,
    Registry,
    RegistryUnavailable,
    crud,
    current_revision,
    head_revision,
    upgrade_to_head,
    with_db_retry,
)
from server_app.registry.models import Base


def test_migrations_create_the_model_schema(db_url):
    assert current_revision(db_url) is None
    assert upgrade_to_head(db_url) == head_revision() == "0002"
    assert upgrade_to_head(db_url) == "0002"  # idempotent on restart
    reg = Registry(db_url)
    try:
        insp = inspect(reg.engine)
        tables = set(insp.get_table_names()) - {"alembic_version"}
        assert tables == set(Base.metadata.tables)
        for name, table in Base.metadata.tables.items():
            assert {c["name"] for c in insp.get_columns(name)} == {c.name for c in table.columns}, name
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("assignments")}
        assert ("round_id", "device_id") in uniques
    finally:
        reg.dispose()


def test_migration_matches_models_no_autogenerate_diff(db_url):
    """The hand-checked migration and the models must not drift (alembic compare_metadata)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade_to_head(db_url)
    reg = Registry(db_url)
    try:
        with reg.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
    finally:
        reg.dispose()


def test_sqlite_pragmas(tmp_path):
    reg = Registry(f"sqlite:///{tmp_path / 'p.db'}")
    with reg.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    reg.dispose()


def test_device_status_upsert_and_list(registry):
    d = registry.run(crud.upsert_device_status, "dev-1", status="online", arch="cnn_small", input_shape=[28, 28, 1],
                     num_samples=600, label_histogram=[60] * 10, capabilities={"train": True})
    assert d.status == "online" and d.last_seen.tzinfo is not None and d.created.tzinfo is not None
    registry.run(crud.upsert_device_status, "dev-1", status="offline")  # Last Will keeps the facts
    registry.run(crud.upsert_device_status, "dev-2", status="online", arch="mlp_tiny")
    with registry.session() as s:
        d1 = crud.get_device(s, "dev-1")
        assert (d1.status, d1.arch, d1.num_samples, d1.label_histogram) == ("offline", "cnn_small", 600, [60] * 10)
        assert [d.id for d in crud.list_devices(s, status="online")] == ["dev-2"]
        assert [d.id for d in crud.list_devices(s, limit=1, offset=1)] == ["dev-2"]
        assert len(crud.list_devices(s)) == 2
    registry.run(crud.revoke_device, "dev-2")
    with registry.session() as s:
        assert [d.id for d in crud.list_devices(s)] == ["dev-1"]
        assert len(crud.list_devices(s, include_revoked=True)) == 2
        with pytest.raises(NotFound):
            crud.get_device(s, "nope")


def test_upsert_from_contract_message(registry):
    from device_firmware_py.contract import DeviceStatus

    msg = DeviceStatus("dev-9", "online", "cnn_small", [8, 8, 1], "litert-2.3", 10, [1, 9], {"x": 1}, ts=1.7e9)
    d = registry.run(crud.upsert_device_status_msg, msg)
    assert d.last_seen == dt.datetime.fromtimestamp(1.7e9, dt.timezone.utc)


def test_round_state_machine(registry):
    r = registry.run(crud.create_round, strategy="koala_hetero", config={"T": 1.0}, quorum=2, participants=["a", "b"])
    assert r.state == "created" and r.id >= 1
    registry.run(crud.transition_round, r.id, "collecting")
    registry.run(crud.transition_round, r.id, "collecting")  # idempotent on resume
    registry.run(crud.transition_round, r.id, "aggregating", metrics={"received": 2})
    r2 = registry.run(crud.transition_round, r.id, "completed", metrics={"acc": 0.8})
    assert r2.started is not None and r2.finished is not None and r2.metrics == {"received": 2, "acc": 0.8}
    with pytest.raises(InvalidTransition):
        registry.run(crud.transition_round, r.id, "collecting")
    other = registry.run(crud.create_round, strategy="fedavg_small")
    with registry.session() as s:
        assert crud.current_round(s).id == other.id
        assert [x.id for x in crud.list_rounds(s, state="completed")] == [r.id]
        assert crud.get_round(s, r.id).config == {"T": 1.0}


def _round_with_devices(registry, n=2):
    for i in range(n):
        registry.run(crud.upsert_device_status, f"d{i}", status="online")
    r = registry.run(crud.create_round, strategy="koala_homo", participants=[f"d{i}" for i in range(n)])

    def assign(s):
        for i in range(n):
            crud.create_assignment(s, r.id, f"d{i}", bytes_down=1000)

    registry.run(assign)
    return r


def test_submission_is_idempotent(registry):
    r = _round_with_devices(registry)
    first = registry.run(crud.record_submission, r.id, "d0", digest="a" * 64, bytes_up=500)
    again = registry.run(crud.record_submission, r.id, "d0", digest="a" * 64, bytes_up=500)  # QoS 1 redelivery
    other = registry.run(crud.record_submission, r.id, "d0", digest="b" * 64, bytes_up=500)
    assert (first.outcome, again.outcome, other.outcome) == ("new", "duplicate", "conflict")
    registry.run(crud.decide_submission, r.id, "d0", "accepted")
    assert registry.run(crud.record_submission, r.id, "d0", digest="a" * 64, bytes_up=500).outcome == "duplicate"
    with registry.session() as s:
        c = crud.round_counts(s, r.id)
        assert (c["accepted"], c["assigned"], c["received"]) == (1, 1, 1)
        assert crud.mark_dropped(s, r.id) == 1
        assert crud.get_assignment(s, r.id, "d1").status == "dropped"
        assert [a.device_id for a in crud.list_assignments(s, round_id=r.id, status="accepted")] == ["d0"]


@pytest.mark.parametrize("pre_assigned", [True, False])
def test_concurrent_duplicate_submissions_count_once(registry, pre_assigned):
    """Four server workers receive the same QoS 1 message at once: exactly one counts."""
    registry.run(crud.upsert_device_status, "d0", status="online")
    r = registry.run(crud.create_round, strategy="koala_homo")
    if pre_assigned:
        registry.run(crud.create_assignment, r.id, "d0")
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        outcomes.append(registry.run(crud.record_submission, r.id, "d0", digest="c" * 64, bytes_up=10).outcome)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["duplicate", "duplicate", "duplicate", "new"]
    with registry.session() as s:
        assert len(crud.list_assignments(s, round_id=r.id)) == 1


def test_rejections_are_recorded(registry):
    r = _round_with_devices(registry)
    registry.run(crud.record_submission, r.id, "d0", digest="a" * 64, bytes_up=10)
    registry.run(crud.record_rejection, reason="nan_or_inf", device_id="d0", round_id=r.id, detail="proxy_logits holds NaN", bytes_up=10)
    registry.run(crud.record_rejection, reason="bad_topic", device_id=None, detail="koala/v1/x", topic="koala/v1/x")
    registry.run(crud.record_rejection, reason="unknown_device", device_id="ghost", round_id=999)  # no FK needed
    with registry.session() as s:
        assert crud.get_assignment(s, r.id, "d0").status == "rejected"
        assert crud.get_assignment(s, r.id, "d0").reason == "nan_or_inf"
        evs = crud.list_events(s, kind="rejected")
        assert [e.detail["reason"] for e in evs] == ["unknown_device", "bad_topic", "nan_or_inf"]
        assert [e.detail["reason"] for e in crud.list_events(s, device_id="d0")] == ["nan_or_inf"]
        assert len(crud.list_events(s, kind="rejected", limit=1, offset=2)) == 1


def test_model_versions_and_metrics(registry):
    r = registry.run(crud.create_round, strategy="koala_homo")
    v0 = registry.run(crud.add_model_version, kind="large", arch="vgg", path="/a/0.pt", sha256="0" * 64, nbytes=10)
    v1 = registry.run(crud.add_model_version, kind="large", arch="vgg", path="/a/1.pt", sha256="1" * 64, nbytes=10, round_id=r.id, metrics={"acc": 0.7})
    assert (v0.version, v1.version) == (0, 1)
    registry.run(crud.record_metrics, {"acc": 0.7, "loss": 0.4, "bad": float("nan"), "name": "x"}, round_id=r.id)
    with registry.session() as s:
        assert crud.latest_model_version(s, "large", "vgg").path == "/a/1.pt"
        assert len(crud.list_model_versions(s, kind="large")) == 2
        from sqlalchemy import select

        from server_app.registry.models import Metric

        assert {m.name for m in s.scalars(select(Metric).where(Metric.round_id == r.id))} == {"acc", "loss"}


def test_outage_raises_registry_unavailable_and_retry_gives_up():
    reg = Registry("postgresql+psycopg://postgres@127.0.0.1:1/none")  # nothing listens on port 1
    assert reg.ping() is False
    with pytest.raises(RegistryUnavailable):
        reg.run(crud.list_devices, retry=False)
    sleeps: list[float] = []
    with pytest.raises(RegistryUnavailable):
        with_db_retry(lambda: reg.run(crud.list_devices, retry=False), attempts=3, sleep=sleeps.append)
    assert sleeps == [0.2, 0.4]
    reg.dispose()


def test_retry_recovers_when_database_comes_back(tmp_path):
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise RegistryUnavailable("down")
        return "ok"

    assert with_db_retry(flaky, sleep=lambda _s: None) == "ok" and calls["n"] == 3


def test_koala_db_command(db_url, capsys):
    from server_app.cli import main

    assert main(["db", "current", "--database-url", db_url]) == 0
    assert "none" in capsys.readouterr().out
    assert main(["db", "upgrade", "--database-url", db_url]) == 0
    assert main(["db", "current", "--database-url", db_url]) == 0
    assert "0002 (head)" in capsys.readouterr().out


def _assignment_rows(registry, round_id):
    with registry.session() as s:
        from sqlalchemy import select

        rows = s.scalars(select(crud.Assignment).where(crud.Assignment.round_id == round_id))  # > MAX_PAGE rows
        return sorted((a.device_id, a.status, a.bytes_down, a.bytes_up, a.digest, a.assigned_at is not None) for a in rows)


def _device_rows(registry, ids):
    with registry.session() as s:
        return sorted((d.id, d.status, d.revoked, d.arch, d.created is not None) for d in (crud.get_device(s, i) for i in ids))


def test_bulk_create_assignments_equals_per_device_calls(registry):
    """RegistryStore.assignments_sent's set-based write == register_device + create_assignment per
    device: known devices untouched, unknown ones created, existing rows keep their status and get
    bytes_down updated unless the new value is 0. 1,203 devices: more than one IN (...) chunk."""
    ids = [f"dev-{i:05d}" for i in range(1203)]
    sent = {d: (0 if i % 7 == 0 else 100_000 + i) for i, d in enumerate(ids)}
    for d in ids[:400]:
        registry.run(crud.upsert_device_status, d, status="online", arch="cnn_small")
    rounds = []
    for _ in range(2):
        r = registry.run(crud.create_round, strategy="koala_homo")

        def pre(s, rid=r.id):
            for i in (0, 3, 7, 8, 399):  # a resumed dispatch: some rows exist already
                crud.create_assignment(s, rid, ids[i], bytes_down=5)
            crud.record_submission(s, rid, ids[3], digest="d" * 64, bytes_up=9)

        registry.run(pre)
        rounds.append(r.id)
    bulk, reference = rounds

    registry.run(crud.create_assignments, bulk, sent)

    def one_by_one(s):  # what assignments_sent did before
        for dev, nbytes in sent.items():
            if s.get(crud.Device, dev) is None:
                crud.register_device(s, dev)
            crud.create_assignment(s, reference, dev, bytes_down=nbytes)

    registry.run(one_by_one)
    assert _assignment_rows(registry, bulk) == _assignment_rows(registry, reference)
    rows = dict((r[0], r) for r in _assignment_rows(registry, bulk))
    assert len(rows) == 1203 and rows[ids[3]][1] == "submitted" and rows[ids[0]][2] == 5 and rows[ids[8]][2] == 100_008
    devs = _device_rows(registry, ids)
    assert devs[0] == (ids[0], "online", False, "cnn_small", True)
    assert devs[-1] == (ids[-1], "unknown", False, None, True)
    registry.run(crud.create_assignments, bulk, sent)  # idempotent on re-dispatch
    assert _assignment_rows(registry, bulk) == _assignment_rows(registry, reference)


def test_bulk_device_insert_skips_rows_a_concurrent_writer_added(registry):
    """Presence may record a device between our SELECT and INSERT: that row must win, not fail."""
    registry.run(crud.upsert_device_status, "d-late", status="online", arch="mlp_tiny")
    registry.run(crud._insert_ignoring_existing, crud.Device,
                 [{"id": "d-late", "status": "unknown", "revoked": False}, {"id": "d-new", "status": "unknown", "revoked": False}],
                 "id")  # fmt: skip
    assert _device_rows(registry, ["d-late", "d-new"]) == [("d-late", "online", False, "mlp_tiny", True),
                                                           ("d-new", "unknown", False, None, True)]  # fmt: skip


@pytest.mark.parametrize("first", ["claim", "close"])
def test_a_claim_and_the_close_of_its_round_serialise(registry, first):
    """Ingestion workers claim accepted rows while the orchestrator closes the round, in other
    transactions: whichever commits first wins, and nothing falls between them. A claim holding
    its (uncommitted) transaction makes the close wait, and the orchestrator's read after the close
    sees the claim; a close holding its transaction makes the claim wait, and the claim then takes
    nothing. On SQLite the database lock serialises them; on PostgreSQL the share lock
    crud.claim_accepted takes on the round row."""
    rid = _round_with_devices(registry, 2).id
    registry.run(crud.transition_round, rid, "collecting")
    claim = [(rid, "d0", "ab" * 32, 10, None)]
    done: dict[str, object] = {}
    with registry.session() as s:  # the first transaction, held open
        if first == "claim":
            assert crud.claim_accepted(s, claim) == {(rid, "d0")}
            other = threading.Thread(target=lambda: done.setdefault("closed", registry.run(crud.close_collection, rid)))
        else:
            crud.close_collection(s, rid)
            other = threading.Thread(target=lambda: done.setdefault("claimed", registry.run(crud.claim_accepted, claim)))
        other.start()
        other.join(1.0)
        assert other.is_alive(), "the second transaction did not wait for the first"
    other.join(30)
    assert not other.is_alive()
    rows = {a.device_id: a.status for a in registry.run(crud.list_assignments, round_id=rid)}
    if first == "claim":  # the claim committed first: the close saw it and dropped only d1
        assert done["closed"] == 1 and rows == {"d0": "accepted", "d1": "dropped"}
    else:  # the close committed first: the claim took nothing
        assert done["claimed"] == set() and rows == {"d0": "dropped", "d1": "dropped"}
    assert registry.run(lambda s: crud.get_round(s, rid).state) == "aggregating"
