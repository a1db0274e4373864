"""Round deadlines per architecture from measured round times, and slow devices told from dead ones
by their progress reports (server_app.rounds.deadlines, MqttFleet)."""

from __future__ import annotations

import threading
import time

import pytest

from device_firmware_py.contract import TrainingPlan
from server_app.engine.types import Assignment, Result
from server_app.policy import KoalaPolicy
from server_app.rounds.deadlines import DeadlinePlanner, alive
from server_app.rounds.fleet import MqttFleet, QuorumNotMet


def test_planner_uses_the_full_deadline_until_every_architecture_is_measured():
    p = DeadlinePlanner(120.0, factor=3.0, min_s=5.0)
    assert p.timeout_for(["cnn_small"]) == 120.0
    p.observe("cnn_small", 4.0)
    assert p.timeout_for(["cnn_small"]) == 120.0  # one sample is not an estimate
    p.observe("cnn_small", 6.0)
    assert p.estimate("cnn_small") == pytest.approx(5.8)  # p90 of [4, 6]
    assert p.timeout_for(["cnn_small"]) == pytest.approx(17.4)
    assert p.timeout_for(["cnn_small", "mobilenet_tiny"]) == 120.0  # mobilenet not measured yet
    for s in (30.0, 50.0):
        p.observe("mobilenet_tiny", s)
    assert p.timeout_for(["cnn_small", "mobilenet_tiny"]) == 120.0  # 3 x 48 > 120: capped at deadline_s
    p.observe("mlp_tiny", 0.2)
    p.observe("mlp_tiny", 0.3)
    assert p.timeout_for(["mlp_tiny"]) == 5.0  # at least deadline_min_s
    p.observe("mlp_tiny", float("nan"))  # nonsense is ignored
    assert DeadlinePlanner(60.0).timeout_for(["mlp_tiny"]) == 60.0  # no factor: the fixed deadline
    assert set(p.snapshot()) == {"cnn_small", "mobilenet_tiny", "mlp_tiny"}


def test_alive_needs_recent_progress_for_this_round():
    now = 1000.0
    assert alive({"round_id": 3, "at": 990.0}, 3, now)
    assert not alive({"round_id": 2, "at": 999.0}, 3, now)  # an older round's progress
    assert not alive({"round_id": 3, "at": 900.0}, 3, now)  # silent for 100 s
    assert not alive(None, 3, now) and not alive({"round_id": 3}, 3, now)


def test_policy_validates_deadline_fields():
    assert KoalaPolicy().deadline_factor is None
    assert KoalaPolicy(deadline_factor=3.0, deadline_min_s=5.0).deadline_min_s == 5.0
    with pytest.raises(ValueError):
        KoalaPolicy(deadline_factor=0.5)


class _Store:
    def assignments_sent(self, round_id, sent, deadline):
        self.deadline = deadline

    def accepted_results(self, round_id):
        return {}

    def close_collection(self, round_id, missing):
        self.missing = list(missing)

    def collection_closed(self, round_id):
        return False

    def accepted_digests(self, round_id, known=-1):
        return None  # no other process accepts results here

    def save_collection(self, col):
        pass

    def segment_index(self, round_id):
        return None


def _assignments(rid: int, devs: list[str]) -> list[Assignment]:
    return [Assignment(rid, d, "mlp_tiny", plan=TrainingPlan(task="local_only", upload=())) for d in devs]


def test_a_slow_device_reporting_progress_gets_extensions_a_dead_one_does_not():
    """Round 0 measures mlp_tiny at ~0.2 s; round 1's deadline is then deadline_min_s (1 s). "slow"
    answers after 2.5 s but reports progress every 0.3 s: the deadline moves on and its result is
    accepted. "dead" never answers: the round closes without it, long before deadline_s (60 s)."""
    progress: dict[str, dict] = {}
    fleet = MqttFleet(lambda *a: None, list, _Store(), num_classes=10, proxy_size=0, proxy_digest=None,
                      default_timeout_s=60.0, planner=DeadlinePlanner(60.0, factor=2.0, min_s=1.0),
                      progress_of=progress.get)  # fmt: skip

    def answer(rid: int, dev: str, after: float, report: bool) -> None:
        t_end = time.time() + after
        while time.time() < t_end:
            if report:
                progress[dev] = {"round_id": rid, "phase": "train", "at": time.time()}
            time.sleep(0.1 if not report else 0.3)
        col = None
        while col is None:
            col = fleet.collection
            time.sleep(0.01)
        col.add(Result(round_id=rid, device_id=dev, arch="mlp_tiny", num_samples=1), 10)

    threads = [threading.Thread(target=answer, args=(0, d, 0.2, False)) for d in ("slow", "dead")]
    for t in threads:
        t.start()
    assert len(fleet.run_round(_assignments(0, ["slow", "dead"]), quorum=2, timeout_s=60.0)) == 2
    for t in threads:
        t.join()
    assert fleet.planner.timeout_for(["mlp_tiny"]) == 1.0

    t = threading.Thread(target=answer, args=(1, "slow", 2.5, True))
    t.start()
    t0 = time.monotonic()
    got = fleet.run_round(_assignments(1, ["slow", "dead"]), quorum=1, timeout_s=60.0)
    waited = time.monotonic() - t0
    t.join()
    assert [r.device_id for r in got] == ["slow"]  # accepted, not cut off at 1 s
    assert fleet.store.missing == ["dead"]
    assert waited < 10.0  # closed by the planned deadline + extensions, not deadline_s (60 s)

    # nobody working: no extension, the round closes at the planned deadline and fails its quorum
    t0 = time.monotonic()
    with pytest.raises(QuorumNotMet):
        fleet.run_round(_assignments(2, ["dead"]), quorum=1, timeout_s=60.0)
    assert time.monotonic() - t0 < 10.0
