"""MqttFleet fan-out: the frames it publishes (teacher body encoded once per round) are byte-for-byte
what the per-device encoder makes (codec.encode_frame, itself pinned to the pre-cache bytes by
tests/device_firmware_py/test_contract_frame_encoder.py), and the registry gets each frame's size."""

from __future__ import annotations

import json

import numpy as np

from device_firmware_py.contract import Assignment as WireAssignment
from device_firmware_py.contract import TrainingPlan, codec, topics
from server_app.engine.types import Assignment, Result
from server_app.rounds.fleet import MqttFleet


class _Store:
    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def assignments_sent(self, round_id: int, sent: dict[str, int], deadline: float) -> None:
        self.sent = dict(sent)

    def accepted_results(self, round_id: int) -> dict[str, Result]:
        return {}

    def close_collection(self, round_id: int, missing: list[str]) -> None:
        pass

    def collection_closed(self, round_id: int) -> bool:
        return False

    def accepted_digests(self, round_id: int, known: int = -1) -> None:
        return None  # no other process accepts results here

    def save_collection(self, col: object) -> None:
        pass

    def segment_index(self, round_id: int) -> None:
        return None


def test_published_frames_equal_the_per_device_encoding():
    assert Assignment is WireAssignment  # one message model: the engine's assignment IS the wire's
    rng = np.random.default_rng(3)
    teacher = (rng.standard_normal((300, 10)) * 2).astype(np.float32)
    idx = np.sort(rng.choice(1000, 300, replace=False))
    assignments = [Assignment(round_id=4, device_id=f"dev-{i:05d}", arch="cnn_small", model_version=1,
                              plan=TrainingPlan(upload=("logits",), seed=i, lr=0.01), teacher_logits=teacher,
                              proxy_indices=idx)
                   for i in range(12)]  # fmt: skip
    published: list[tuple[str, bytes]] = []
    store = _Store()
    fleet = MqttFleet(lambda t, p, q, r: published.append((t, p)), list, store, num_classes=10, proxy_size=1000,
                      proxy_digest="ef" * 32, default_timeout_s=0.05)  # fmt: skip
    assert fleet.run_round(assignments, quorum=0, timeout_s=0.05) == []  # nobody answers: quorum 0
    assert [t for t, _ in published] == [topics.device_assign(a.device_id) for a in assignments]
    for a, (_t, frame) in zip(assignments, published, strict=True):
        hlen = codec._PREFIX.unpack_from(frame)[4]
        meta = json.loads(frame[12 : 12 + hlen])["meta"]
        assert meta["deadline"] == a.deadline and meta["proxy_digest"] == "ef" * 32  # stamped by the fleet
        assert frame == codec.encode_frame(a)
        back = codec.decode_frame(frame, WireAssignment)
        assert back.device_id == a.device_id and back.plan == a.plan and back.proxy_indices.tolist() == idx.tolist()
        assert store.sent[a.device_id] == len(frame)
    assert fleet.last_stats["bytes_down_total"] == sum(map(len, (f for _t, f in published)))


def test_collection_complete_needs_every_participant():
    from server_app.rounds.collection import Collection, Expectation

    def res(dev: str) -> Result:
        return Result(round_id=1, device_id=dev, arch="cnn_small", num_samples=1)

    expect = {d: Expectation.from_assignment(Assignment(1, d, "cnn_small", plan=TrainingPlan(task="local_only", upload=())),
                                             num_classes=10, proxy_size=0, proxy_digest=None) for d in ("a", "b")}  # fmt: skip
    col = Collection(round_id=1, expect=expect, deadline=2e9)
    assert col.participants == frozenset({"a", "b"})
    assert not col.complete()
    col.add(res("a"), 1)
    col.results["x"] = res("x")  # a stray non-participant must not count (resumed rounds set results directly)
    assert len(col.results) == 2 and not col.complete()
    col.add(res("b"), 1)
    assert col.complete()


def test_assignment_fanout_waits_for_the_broker_every_publish_window():
    """Bounded memory while a large fleet is dispatched: every `publish_window`-th frame is published
    with a wait for its PUBACK, so the MQTT client never holds more than about one window of frames
    (a 10,000-device round held all 10,000 x 100 kB until the broker took them)."""
    calls: list[float | None] = []
    fleet = MqttFleet(lambda t, p, q, r, wait_s=None: calls.append(wait_s), list, _Store(), num_classes=10,
                      proxy_size=0, proxy_digest=None, default_timeout_s=0.05, publish_window=4)  # fmt: skip
    plan = TrainingPlan(task="local_only", upload=())
    fleet.run_round([Assignment(1, f"dev-{i:05d}", "mlp_tiny", plan=plan) for i in range(10)], quorum=0, timeout_s=0.05)
    assert [i for i, w in enumerate(calls, 1) if w is not None] == [4, 8]
    assert all(w is None or w > 0 for w in calls)
