"""Ingestion + MqttFleet against a real Mosquitto and a real registry (SQLite and PostgreSQL).

The "devices" here are real MQTT clients publishing crafted result frames (a misbehaving device is
exactly that), the server side is the production Ingestor/MqttFleet/RegistryStore. Proves:
duplicate submission counted once; spoofed device id rejected with its reason; wrong round
rejected; a straggler after the deadline recorded `late` and not folded in; below quorum fails.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import numpy as np
import pytest

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.plan import TrainingPlan
from device_firmware_py.mqtt import MqttClient
from server_app.engine.types import Assignment

pytestmark = pytest.mark.mosquitto
P, C = 40, 10


def _wait(pred: Any, timeout_s: float = 20.0, what: str = "condition") -> None:
    t_end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _result(round_id: int, device_id: str, seed: int = 0) -> bytes:
    logits = np.random.default_rng(seed).normal(size=(P, C)).astype(np.float32)
    return codec.encode_frame(cm.Result(round_id=round_id, device_id=device_id, arch="cnn_small", num_samples=10,
                                        label_histogram=[1] * C, proxy_logits=logits))  # fmt: skip


@pytest.fixture
def server(registry, mosquitto_broker, tmp_path):
    from server_app.ingest import Ingestor, Presence
    from server_app.rounds.fleet import MqttFleet
    from server_app.rounds.store import RegistryStore

    store = RegistryStore(registry, tmp_path)
    presence = Presence()
    link = MqttClient(f"srv-{secrets.token_hex(3)}", mosquitto_broker.host, mosquitto_broker.port, clean_session=True,
                      manual_ack=True)
    fleet = MqttFleet(link.publish, presence.online, store, num_classes=C, proxy_size=P, proxy_digest=None,
                      default_timeout_s=30)  # fmt: skip
    ingestor = Ingestor(store, presence, lambda: fleet.collection)
    from server_app.ingest_worker import subscribe_results

    worker = subscribe_results(link, topics.shared("koala-server", topics.filter_results()), ingestor)
    assert link.start(wait_s=10)
    devices = {}
    for d in ("d1", "d2"):
        devices[d] = MqttClient(f"dev-{d}-{secrets.token_hex(3)}", mosquitto_broker.host, mosquitto_broker.port, clean_session=True)
        assert devices[d].start(wait_s=10)
    yield store, fleet, ingestor, devices, registry
    for c in (link, *devices.values()):
        c.stop()
    worker.stop(timeout_s=5.0)


def _run_round(store, fleet, round_id: int, quorum: int, timeout_s: float) -> dict[str, Any]:
    store.ensure_round(round_id, "test", {}, 0)
    assigns = [Assignment(round_id, d, "cnn_small", plan=TrainingPlan(upload=("logits",))) for d in ("d1", "d2")]
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["results"] = fleet.run_round(assigns, quorum, timeout_s)
        except Exception as exc:  # QuorumNotMet is asserted by the caller
            out["error"] = exc

    t = threading.Thread(target=go)
    t.start()
    _wait(lambda: fleet.collection is not None and store.submission(round_id, "d2") is not None, what="collection open")
    out["thread"] = t
    return out


def _statuses(registry, round_id: int) -> dict[str, tuple[str, str | None]]:
    from server_app.registry import crud

    return {a.device_id: (a.status, a.reason) for a in registry.run(crud.list_assignments, round_id=round_id)}


def _rejections(registry) -> list[str]:
    from server_app.registry import crud

    return [e.detail["reason"] for e in registry.run(crud.list_events, kind="rejected")]


def test_duplicate_spoof_wrong_round_then_accept(server):
    store, fleet, ingestor, dev, registry = server
    run = _run_round(store, fleet, 0, quorum=2, timeout_s=30)
    good1 = _result(0, "d1", seed=1)
    dev["d1"].publish(topics.device_result("d1"), good1, 1)
    dev["d1"].publish(topics.device_result("d1"), good1, 1)  # QoS 1 redelivery / device re-publish
    _wait(lambda: ingestor.counts["accepted"] == 1 and ingestor.counts["duplicate"] == 1, what="d1 accepted once")
    # d2 speaks for d1 (its topic is d2's, which the broker ACL authenticated): spoofed
    dev["d2"].publish(topics.device_result("d2"), _result(0, "d1", seed=2), 1)
    dev["d2"].publish(topics.device_result("d2"), _result(99, "d2", seed=3), 1)  # a round that is not collecting
    dev["d2"].publish(topics.device_result("d2"), b"KOAL" + bytes([codec.FRAME_VERSION]) + b"\x02garbage", 1)  # malformed frame: a reason, no crash
    dev["d2"].publish(topics.device_result("d2"), _result(0, "d2", seed=4), 1)
    run["thread"].join(30)
    assert "error" not in run, run.get("error")
    results = run["results"]
    assert sorted(r.device_id for r in results) == ["d1", "d2"]
    np.testing.assert_allclose(results[0].proxy_logits, codec.decode(good1).proxy_logits)
    # the round can close before the ingest batch that completed it has counted its outcome
    _wait(lambda: ingestor.counts["accepted"] == 2, what="d2's accept counted")
    assert ingestor.counts["accepted"] == 2 and ingestor.counts["duplicate"] == 1
    assert ingestor.counts["rejected:spoofed_device"] == 1 and ingestor.counts["rejected:wrong_round"] == 1
    reasons = _rejections(registry)
    assert {"spoofed_device", "wrong_round"} <= set(reasons)
    assert len(reasons) == 3, reasons  # + the malformed frame (its header length is absurd: "oversize")
    assert _statuses(registry, 0) == {"d1": ("accepted", None), "d2": ("accepted", None)}
    # the accepted payload is on disk (resume) and its digest is the DB's idempotency key
    assert set(store.accepted_results(0)) == {"d1", "d2"}


def test_straggler_is_late_and_quorum_failure(server):
    from server_app.rounds.fleet import QuorumNotMet

    store, fleet, ingestor, dev, registry = server
    run = _run_round(store, fleet, 1, quorum=1, timeout_s=2.0)
    dev["d1"].publish(topics.device_result("d1"), _result(1, "d1"), 1)
    run["thread"].join(30)
    assert [r.device_id for r in run["results"]] == ["d1"]
    assert _statuses(registry, 1)["d2"] == ("dropped", "deadline")
    dev["d2"].publish(topics.device_result("d2"), _result(1, "d2"), 1)  # after the deadline
    _wait(lambda: ingestor.counts["late"] == 1, what="late recorded")
    assert _statuses(registry, 1)["d2"][0] == "late"
    assert store.accepted_results(1).keys() == {"d1"}  # not folded in

    run = _run_round(store, fleet, 2, quorum=2, timeout_s=1.5)  # nobody answers d2: below quorum
    dev["d1"].publish(topics.device_result("d1"), _result(2, "d1"), 1)
    run["thread"].join(30)
    assert isinstance(run.get("error"), QuorumNotMet) and run["error"].accepted == 1


def test_presence_online_count_tracks_online_list():
    """The O(1) online counter (Prometheus gauge on every status) always equals len(online())."""
    from server_app.ingest import Presence

    p = Presence()
    seq = [
        cm.DeviceStatus("a", "online", "cnn_small"), cm.DeviceStatus("b", "online", "mlp_tiny"),
        cm.DeviceStatus("a", "online", "cnn_small"),  # repeated retained status: no double count
        cm.DeviceStatus("c", "online"),  # no arch yet: not selectable, not counted
        cm.DeviceStatus("b", "offline"), cm.DeviceStatus("c", "online", "cnn_small"),
        cm.DeviceStatus("b", "online", "mlp_tiny"),
    ]  # fmt: skip
    for st in seq:
        p.update(st)
        assert p.online_count() == len(p.online())
    for dev in ("a", "zz", "a", "b"):  # cleared retained messages, unknown and twice
        p.forget(dev)
        assert p.online_count() == len(p.online())
    assert p.online_count() == 1
