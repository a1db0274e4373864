"""Batched result ingestion: same outcomes as one at a time, nothing acknowledged before commit,
accepted payloads recoverable from segments (real SQLite/PostgreSQL registry, real Mosquitto).

- a batch with valid / duplicate / spoofed / bad-shape-then-valid / malformed / late / unknown /
  conflicting frames gives the outcomes, rows and rejection events of one-by-one ingestion;
- more results than the broker's inflight window while the registry is blocked: the worker holds
  exactly one window (nothing was acknowledged, or the broker would have sent more), and after the
  registry is released every result is accepted exactly once;
- segment recovery: a torn trailing record, a record whose digest is not the row's, and a frame
  the registry never accepted are ignored.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from typing import Any

import numpy as np
import pytest

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm

P, C = 40, 10
DEVS = ["d1", "d2", "d3", "d4", "d5"]


def _result(round_id: int, device_id: str, seed: int = 0, shape: tuple[int, int] = (P, C)) -> bytes:
    logits = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return codec.encode_frame(cm.Result(round_id=round_id, device_id=device_id, arch="cnn_small", num_samples=10,
                                        label_histogram=[1] * C, proxy_logits=logits))  # fmt: skip


def _env(registry: Any, data_dir: Any, devices: list[str]) -> tuple[Any, Any, Any]:
    """RegistryStore + Ingestor with round 0 collecting from `devices`; round 1 exists (closed here)."""
    from device_firmware_py.contract.plan import TrainingPlan
    from server_app.ingest import Ingestor, Presence
    from server_app.rounds.collection import Collection, Expectation
    from server_app.rounds.store import RegistryStore

    store = RegistryStore(registry, data_dir)
    for r in (0, 1):
        store.ensure_round(r, "test", {}, 0)
        store.assignments_sent(r, dict.fromkeys(devices, 1), time.time() + 3600)
    expect = {d: Expectation.from_assignment(cm.Assignment(0, d, "cnn_small", plan=TrainingPlan(upload=("logits",))),
                                             num_classes=C, proxy_size=P, proxy_digest=None) for d in devices}  # fmt: skip
    col = Collection(round_id=0, expect=expect, deadline=time.time() + 3600)
    return store, col, Ingestor(store, Presence(), lambda: col)


def _mixed() -> list[tuple[str, bytes]]:
    t = topics.device_result
    good1 = _result(0, "d1", seed=1)
    return [
        (t("d1"), good1),
        (t("d1"), good1),  # the same bytes again (QoS 1 redelivery) in the same batch
        (t("d2"), _result(0, "d1", seed=2)),  # spoofed: d2's topic, d1's payload
        (t("d3"), _result(0, "d3", seed=3, shape=(P + 1, C))),  # bad shape: rejected ...
        (t("d3"), _result(0, "d3", seed=4)),  # ... then its valid result is still taken
        (t("d4"), b"KOAL" + bytes([codec.FRAME_VERSION]) + b"\x02garbage"),  # malformed frame
        (t("d5"), _result(1, "d5", seed=5)),  # round 1 is not collecting: late
        (t("d1"), _result(0, "d1", seed=6)),  # a different second submission: rejected duplicate
        (t("zz"), _result(0, "zz", seed=7)),  # never assigned in the collecting round: unknown_device
        (t("d2"), _result(0, "d2", seed=8)),  # d2's own valid result
    ]


def _rows(registry: Any) -> dict[tuple[int, str], tuple[str, str | None, str | None]]:
    from server_app.registry import crud

    return {(a.round_id, a.device_id): (a.status, a.reason, a.digest) for a in registry.run(crud.list_assignments)}


def _reasons(registry: Any) -> list[str]:
    from server_app.registry import crud

    return [e.detail["reason"] for e in registry.run(crud.list_events, kind="rejected")]  # audit order kept


def test_batch_gives_the_outcomes_of_one_by_one(registry, tmp_path):
    from server_app.registry import Registry

    items = _mixed()
    _, col_b, batch = _env(registry, tmp_path / "batch", DEVS)
    outs_b = batch.ingest_batch(items)

    ref_reg = Registry(f"sqlite:///{tmp_path / 'ref.db'}")
    ref_reg.upgrade()
    try:
        _, col_s, single = _env(ref_reg, tmp_path / "single", DEVS)
        outs_s = [single.ingest_batch([(t, p)])[0] for t, p in items]
        assert [(o.status, o.reason, o.device_id) for o in outs_b] == [(o.status, o.reason, o.device_id) for o in outs_s]
        assert _rows(registry) == _rows(ref_reg)
        assert _reasons(registry) == _reasons(ref_reg)
        assert batch.counts == single.counts
        assert (col_b.received, col_b.rejected, sorted(col_b.results)) == (col_s.received, col_s.rejected,
                                                                            sorted(col_s.results))  # fmt: skip
    finally:
        ref_reg.dispose()
    assert [o.status for o in outs_b] == ["accepted", "duplicate", "rejected", "rejected", "accepted", "rejected",
                                          "late", "rejected", "rejected", "accepted"]  # fmt: skip
    assert [o.reason for o in outs_b if o.status == "rejected"] == ["spoofed_device", "bad_shape", "oversize",
                                                                    "duplicate", "unknown_device"]  # fmt: skip
    rows = _rows(registry)
    assert {d: rows[(0, d)][0] for d in ("d1", "d2", "d3")} == dict.fromkeys(("d1", "d2", "d3"), "accepted")
    assert rows[(1, "d5")][0] == "late"
    assert sorted(col_b.results) == ["d1", "d2", "d3"]


def test_segments_recover_only_what_the_registry_accepted(tmp_path):
    from server_app import submission_log
    from server_app.registry import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'k.db'}")
    reg.upgrade()
    try:
        store, _, ing = _env(reg, tmp_path, DEVS)
        frames = {d: _result(0, d, seed=i) for i, d in enumerate(DEVS[:3])}
        outs = ing.ingest_batch([(topics.device_result(d), f) for d, f in frames.items()])
        assert [o.status for o in outs] == ["accepted"] * 3
        segs = sorted(submission_log.round_dir(tmp_path, 0).glob("seg-*.seg"))
        assert len(segs) == 1  # one segment (one fsync) for the batch
        # a frame the registry never accepted (d4), and a different d1 frame: neither counts
        submission_log.write_segment(tmp_path, 0, [_result(0, "d4", seed=9), _result(0, "d1", seed=10)])
        with open(segs[0], "ab") as f:  # a crash mid-append: length prefix says more than is there
            f.write((5000).to_bytes(4, "big") + b"partial")
        got = store.accepted_results(0)
        assert sorted(got) == ["d1", "d2", "d3"]
        np.testing.assert_allclose(got["d1"].proxy_logits, codec.decode(frames["d1"]).proxy_logits)
        # torn inside d3's record (the last whole one): d3 is not recovered, the rest is
        data = segs[0].read_bytes()
        segs[0].write_bytes(data[: data.index(frames["d3"]) + 100])
        assert sorted(store.accepted_results(0)) == ["d1", "d2"]
    finally:
        reg.dispose()


@pytest.mark.mosquitto
def test_blocked_registry_holds_one_inflight_window_then_loses_nothing(tmp_path):
    """More results than the broker's inflight window while the registry cannot commit."""
    from device_firmware_py.mqtt import MqttClient
    from server_app.ingest_worker import subscribe_results
    from server_app.registry import Registry
    from server_app.transport.broker import MosquittoBroker, find_mosquitto_binary

    if find_mosquitto_binary() is None:
        pytest.skip("mosquitto binary not installed")
    window, n = 20, 70
    devices = [f"w{i:03d}" for i in range(n)]
    db = tmp_path / "k.db"
    reg = Registry(f"sqlite:///{db}")
    reg.upgrade()
    broker = MosquittoBroker(workdir=tmp_path / "broker", persistence=False, max_inflight_messages=window).start()
    server = MqttClient(f"srv-{secrets.token_hex(3)}", broker.host, broker.port, clean_session=True, manual_ack=True)
    dev = MqttClient(f"pub-{secrets.token_hex(3)}", broker.host, broker.port, clean_session=True)
    worker = None
    lock = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        store, _, ing = _env(reg, tmp_path, devices)
        worker = subscribe_results(server, topics.shared("koala-server", topics.filter_results()), ing)
        assert server.start(wait_s=10) and dev.start(wait_s=10)
        time.sleep(0.3)  # SUBACK
        lock.execute("BEGIN IMMEDIATE")  # the registry takes reads, but no commit can happen
        for i, d in enumerate(devices):
            assert dev.publish(topics.device_result(d), _result(0, d, seed=i), 1, wait_s=10)
        _until(lambda: worker.received >= window, "one inflight window delivered")
        time.sleep(1.0)  # the broker would have sent more by now had anything been acknowledged
        assert worker.received == window, "results were acknowledged before their batch was committed"
        assert ing.counts["accepted"] == 0
        lock.execute("ROLLBACK")
        _until(lambda: ing.counts["accepted"] == n, "all results accepted after the registry is back")
        assert worker.received == n and set(ing.counts) == {"accepted"}  # each delivered and accepted once
        rows = _rows(reg)
        assert all(rows[(0, d)][0] == "accepted" for d in devices)
        assert sorted(store.accepted_results(0)) == devices
    finally:
        lock.close()
        if worker is not None:
            worker.stop()
        for c in (server, dev):
            c.stop()
        broker.cleanup()
        reg.dispose()


def _until(pred: Any, what: str, timeout_s: float = 60.0) -> None:
    t_end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_an_ingestion_worker_accepts_into_the_open_round_and_the_close_is_exact(tmp_path):
    """What `koala serve --role ingest` does, on one registry: the worker learns the open round from
    the registry and collection.json (RoundFollower), accepts without holding tensors, and the
    orchestrator reads the accepts back from the registry and the segments. Once the round is
    closed in the registry, a result the worker already judged valid is recorded `late`, not
    accepted behind the orchestrator's back."""
    from server_app import submission_log
    from server_app.ingest import Ingestor, Presence
    from server_app.registry import Registry, crud
    from server_app.rounds.follower import RoundFollower

    reg = Registry(f"sqlite:///{tmp_path / 'k.db'}")
    reg.upgrade()
    try:
        store, col, _ = _env(reg, tmp_path, DEVS)
        reg.run(crud.transition_round, 1, "failed")  # round 0 is then the registry's open round
        store.save_collection(col)  # what MqttFleet writes before dispatch
        follower = RoundFollower(store, Presence())
        worker = Ingestor(store, follower.presence, follower.collection, refresh_collection=follower.refresh)
        frames = {d: _result(0, d, seed=i) for i, d in enumerate(DEVS)}
        outs = worker.ingest_batch([(topics.device_result(d), frames[d]) for d in ("d1", "d2")])
        assert [o.status for o in outs] == ["accepted", "accepted"]
        view = follower.collection()
        assert view is not None and view.round_id == 0 and view.results == {} and view.accepted == 2  # no tensors held
        # the orchestrator's side: accepted rows from the registry, records from the segments
        rows = store.accepted_digests(0)
        assert rows == {d: codec.frame_digest(frames[d]) for d in ("d1", "d2")}
        assert store.accepted_digests(0, known=2) is None  # nothing new: one COUNT, no rows
        index = store.segment_index(0)
        got = index.load(rows)
        assert index.nbytes(rows["d1"]) == len(frames["d1"])  # the result message's size, for round stats
        np.testing.assert_allclose(got["d2"].proxy_logits, codec.decode(frames["d2"]).proxy_logits)
        # a half-written segment is never visible: only whole renamed ones are read
        (submission_log.round_dir(tmp_path, 0) / ".tmp-seg-partial.seg").write_bytes(b"KSEG\x00\x00")
        outs = worker.ingest_batch([(topics.device_result("d3"), frames["d3"])])
        assert outs[0].status == "accepted"
        assert sorted(index.load(store.accepted_digests(0))) == ["d1", "d2", "d3"]  # incremental read
        # the orchestrator closes the round; the worker's view has not polled yet
        store.close_collection(0, ["d4", "d5"])
        outs = worker.ingest_batch([(topics.device_result("d4"), frames["d4"])])
        assert [(o.status, o.reason) for o in outs] == [("late", "late")]
        assert sorted(store.accepted_digests(0)) == ["d1", "d2", "d3"]  # final: exactly what was accepted
        statuses = {d: s for (r, d), (s, _reason, _dg) in _rows(reg).items() if r == 0}
        assert statuses == {"d1": "accepted", "d2": "accepted", "d3": "accepted", "d4": "late", "d5": "dropped"}
        follower.refresh()
        assert follower.collection().closed  # the view follows the registry
    finally:
        reg.dispose()
