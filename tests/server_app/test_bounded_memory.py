"""Issue 18, bounded server memory: what a collecting round holds does not grow with the fleet.

- `ResultSpill`: accepted tensors go to a file as they arrive and come back, equal, as views of
  one mapping when the collection closes; the file is gone once mapped.
- `MqttFleet(spill_dir=...)`: while a round collects, its results hold no tensors; the results it
  returns carry exactly what the devices sent.
- `IngestWorker` backpressure: past `max_backlog` queued results the MQTT handler waits for the
  worker (the broker was seen delivering 1,000+ unacknowledged results despite its inflight
  window), and a stuck worker holds it at most `hold_s` per delivery.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_firmware_py.contract import TrainingPlan
from server_app.engine.types import Assignment, Result
from server_app.ingest_worker import IngestWorker
from server_app.rounds.fleet import MqttFleet
from server_app.rounds.spill import ResultSpill
from tests.server_app.test_fleet_fanout import _Store


def _result(dev: str, rng: np.random.Generator, *, logits: bool = True, weights: bool = False) -> Result:
    return Result(round_id=1, device_id=dev, arch="cnn_small", num_samples=5, label_histogram=[5] + [0] * 9,
                  proxy_logits=(rng.standard_normal((40, 10)) * 3).astype(np.float32) if logits else None,
                  weights=[rng.standard_normal((3, 3)).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
                  if weights else None)  # fmt: skip


def test_spill_gives_back_equal_tensors_as_views_and_leaves_no_file(tmp_path):
    rng = np.random.default_rng(0)
    sent = [_result(f"dev-{i}", rng, weights=i % 2 == 0) for i in range(5)]
    want = [
        (r.proxy_logits.astype(np.float16), None if r.weights is None else [w.copy() for w in r.weights])
        for r in sent
    ]
    spill = ResultSpill(tmp_path / "spill" / "r1.tensors")
    held = [spill.put(r) for r in sent]
    assert all(r.proxy_logits is None and r.weights is None for r in held)  # nothing left in memory
    assert spill.nbytes == sum(z.nbytes + sum(w.nbytes for w in ws or []) for z, ws in want)
    with pytest.raises(ValueError, match="already spilled"):
        spill.put(_result("dev-0", rng))
    spill.attach(held)
    assert not (tmp_path / "spill" / "r1.tensors").exists()  # unlinked once mapped
    for r, (z, ws) in zip(held, want, strict=True):
        assert r.proxy_logits.dtype == np.float16 and np.array_equal(r.proxy_logits, z)
        if ws is None:
            assert r.weights is None
        else:
            assert all(
                np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(r.weights, ws, strict=True)
            )
    with pytest.raises(ValueError, match="read-only"):
        held[0].proxy_logits[0, 0] = 99  # strategies compute on copies; a write is a bug, loudly


def test_a_discarded_spill_removes_its_file(tmp_path):
    spill = ResultSpill(tmp_path / "r2.tensors")
    spill.put(_result("dev-0", np.random.default_rng(1)))
    spill.close()
    assert not (tmp_path / "r2.tensors").exists()


def test_a_collecting_round_holds_no_tensors_and_returns_what_devices_sent(tmp_path):
    rng = np.random.default_rng(2)
    devices = [f"dev-{i:05d}" for i in range(6)]
    fleet = MqttFleet(lambda t, p, q, r, wait_s=None: None, list, _Store(), num_classes=10, proxy_size=40,
                      proxy_digest=None, default_timeout_s=10.0, spill_dir=tmp_path / "spill")  # fmt: skip
    plan = TrainingPlan(upload=("logits",))
    sent = {d: _result(d, rng) for d in devices}
    want = {d: r.proxy_logits.astype(np.float16) for d, r in sent.items()}
    held_during: list[bool] = []

    def devices_answer() -> None:
        while fleet.collection is None:
            time.sleep(0.01)
        col = fleet.collection
        for d in devices:
            col.add(sent[d], 100)
        held_during.extend(r.proxy_logits is None for r in col.results.values())

    t = threading.Thread(target=devices_answer)
    t.start()
    got = fleet.run_round(
        [Assignment(1, d, "cnn_small", plan=plan) for d in devices], quorum=6, timeout_s=10.0
    )
    t.join()
    assert held_during == [True] * 6  # while collecting: metadata only
    assert [r.device_id for r in got] == devices
    assert all(np.array_equal(r.proxy_logits, want[r.device_id]) for r in got)
    assert list((tmp_path / "spill").iterdir()) == []


def test_ingest_backlog_holds_the_mqtt_thread_until_the_worker_takes_a_batch():
    gate = threading.Event()
    taken: list[int] = []

    def ingest(items):
        gate.wait(10)
        taken.append(len(items))
        return []

    from server_app import metrics

    waits0 = metrics.REGISTRY.get_sample_value("koala_ingest_backpressure_total") or 0.0
    w = IngestWorker(ingest, max_batch=4, max_backlog=8, hold_s=30.0).start()
    acks: list[int] = []
    done = threading.Event()

    def mqtt_thread() -> None:
        for i in range(30):
            w.submit("t", b"x", lambda i=i: acks.append(i))
        done.set()

    t = threading.Thread(target=mqtt_thread, daemon=True)
    t.start()
    time.sleep(0.5)
    assert not done.is_set() and w.holds >= 1  # the handler is held: the socket is not read
    assert w.peak_backlog <= 8
    gate.set()
    assert done.wait(10)
    assert w.stop(10)
    assert sorted(acks) == list(range(30)) and sum(taken) == 30  # nothing lost, everything acknowledged
    assert w.peak_backlog <= 8
    waits = metrics.REGISTRY.get_sample_value("koala_ingest_backpressure_total") - waits0
    assert waits == w.holds  # operators see every wait on /metrics


def test_a_stuck_worker_holds_each_delivery_at_most_hold_s():
    gate = threading.Event()
    w = IngestWorker(lambda items: gate.wait(10) and [], max_batch=1, max_backlog=2, hold_s=0.2).start()
    t0 = time.monotonic()
    for _ in range(4):
        w.submit("t", b"x", lambda: None)
    held = time.monotonic() - t0
    assert w.holds >= 2 and held >= 0.2  # held, then read on (keepalive must not starve)
    gate.set()
    assert w.stop(10)


def _resident_kib(path_hint: str) -> int:
    """Rss of the mappings of a file (by name in /proc/self/smaps), in KiB."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
            inside = path_hint in line
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_release_pages_hands_a_read_teachers_pages_back(tmp_path):
    from server_app.engine.pages import release_pages

    rng = np.random.default_rng(4)
    spill = ResultSpill(tmp_path / "r3.tensors")
    held = [spill.put(Result(round_id=1, device_id=f"d{i}", arch="a", num_samples=1, label_histogram=[1],
                             proxy_logits=rng.standard_normal((20_000, 10)).astype(np.float32))) for i in range(4)]  # fmt: skip
    spill.attach(held)
    total = sum(float(np.asarray(r.proxy_logits, np.float64).sum()) for r in held)  # touch every page
    assert _resident_kib("r3.tensors") >= 4 * 20_000 * 10 * 2 // 1024 - 8
    for r in held:
        release_pages(r.proxy_logits)
    assert _resident_kib("r3.tensors") <= 8  # at most the pages shared with a neighbour's edge
    again = sum(float(np.asarray(r.proxy_logits, np.float64).sum()) for r in held)
    assert again == total  # released pages read back unchanged
    release_pages(np.zeros(3))  # in-memory arrays: nothing to do


@pytest.mark.parametrize("clip", [None, 2.0])
def test_fedavg_folds_devices_one_at_a_time_with_the_stacked_rules_values(clip):
    """The streaming FedAvg (no [D, N] stack) gives what the stacked formula gives: sample-weighted
    mean of the (clipped) updates, and the same diagnostics."""
    from server_app.engine.robust import aggregate_weights, clip_updates

    rng = np.random.default_rng(5)
    ref = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    sets = [[r + rng.standard_normal(r.shape).astype(np.float32) * s for r in ref] for s in (0.1, 0.2, 0.1, 3.0, 0.15)]
    n = np.array([10.0, 20, 30, 40, 50])
    info: dict = {}
    got = aggregate_weights(sets, n, "fedavg", reference=ref, clip_factor=clip, info=info)
    flat = np.stack([np.concatenate([np.asarray(w, np.float64).ravel() for w in ws]) for ws in sets])
    fref = np.concatenate([np.asarray(w, np.float64).ravel() for w in ref])
    if clip is not None:
        flat, norms, bound = clip_updates(flat, fref, None, clip)
        assert info["clip_bound"] == pytest.approx(bound) and info["clipped"] == [3]
        assert np.allclose(info["update_norms"], norms)
    want = np.tensordot(n / n.sum(), flat, axes=1)
    assert np.allclose(np.concatenate([g.ravel() for g in got]), want, atol=1e-6)
    assert [g.shape for g in got] == [w.shape for w in ref] and all(g.dtype == np.float32 for g in got)


def test_spilled_arrays_equal_the_in_memory_list(tmp_path):
    from server_app.engine.tensor_file import spilled

    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal((7, 3)).astype(np.float32) for _ in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(spilled(iter(arrays), tmp_path / "own.tensors"), arrays, strict=True))
    assert spilled(iter(arrays), None) == arrays
    assert list(tmp_path.iterdir()) == []


def test_the_in_place_softmax_is_bitwise_the_per_device_one():
    from server_app.engine.probability import sanitize_logits, sanitized_softmax_inplace, softmax

    z = (np.random.default_rng(7).standard_normal((9, 50, 10)) * 5).astype(np.float16)
    z[0, 0, 0], z[1, 1, 1], z[2, 2, 2] = np.nan, np.inf, -np.inf
    want = np.stack([softmax(sanitize_logits(x)) for x in z])
    assert np.array_equal(sanitized_softmax_inplace(z.astype(np.float64)), want)


def test_a_new_leader_clears_stale_spill_files(tmp_path):
    from server_app.rounds.spill import clear_stale

    (tmp_path / "r7.tensors").write_bytes(b"x" * 10)  # a server died while round 7 collected
    (tmp_path / "own-cnn_small-123-abcd.tensors").write_bytes(b"y")
    (tmp_path / "keep.txt").write_text("not ours")
    assert clear_stale(tmp_path) == 2
    assert [f.name for f in tmp_path.iterdir()] == ["keep.txt"]
    assert clear_stale(tmp_path / "missing") == 0


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "agreement"])
def test_robust_fusion_in_row_blocks_equals_the_stacked_rule(rule, monkeypatch):
    """The robust rules judge a few proxy rows at a time (bounded memory at any fleet size) and give
    what the whole [D, P, C] stack gives (the formulas of the module doc, computed stacked here)."""
    from server_app.engine import fusion
    from server_app.engine.probability import sanitize_logits, softmax
    from server_app.engine.robust import coordinate_median, coordinate_trimmed_mean

    rng = np.random.default_rng(8)
    logits = [(rng.standard_normal((37, 4)) * 3).astype(np.float16) for _ in range(6)]
    logits[5][:] = 30 * np.eye(4, dtype=np.float16)[0]  # a one-hot liar
    p = softmax(sanitize_logits(np.stack(logits)), 2.0)
    mean = p.mean(axis=0)
    if rule == "median":
        want = fusion._row_normalize(coordinate_median(p), mean)
    elif rule == "trimmed_mean":
        want = fusion._row_normalize(coordinate_trimmed_mean(p, 0.2), mean)
    else:
        ref = fusion._row_normalize(coordinate_median(p), mean).argmax(-1)
        a = (p.argmax(-1) == ref[None, :]).mean(axis=1)
        want = np.tensordot(a**2 / (a**2).sum(), p, axes=1)
    want = (want / want.sum(axis=-1, keepdims=True)).astype(np.float32)
    monkeypatch.setattr(fusion, "ROBUST_BLOCK_BYTES", 6 * 4 * 8 * 5)  # 5 rows per block: 8 blocks
    got = fusion.fuse_logits(logits, rule, temperature=2.0)
    assert np.allclose(got, want, atol=1e-6) and got.dtype == np.float32


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize("clip", [None, 2.0])
def test_coordinatewise_weight_rules_in_column_blocks_equal_the_stacked_rule(rule, clip, monkeypatch):
    from server_app.engine import robust

    rng = np.random.default_rng(9)
    ref = [rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
    sets = [[r + rng.standard_normal(r.shape).astype(np.float32) * s for r in ref] for s in (0.1, 0.3, 0.2, 5.0, 0.1, 0.2)]
    flat = np.stack([robust._flat(ws) for ws in sets])
    fref = robust._flat(ref)
    if clip is not None:
        flat, _norms, _bound = robust.clip_updates(flat, fref, None, clip)
    want = robust.coordinate_median(flat) if rule == "median" else robust.coordinate_trimmed_mean(flat, 0.2)
    monkeypatch.setattr(robust, "BLOCK_BYTES", 6 * 8 * 4)  # 4 coordinates per block: 5 blocks of 19
    info: dict = {}
    got = robust.aggregate_weights(sets, [1] * 6, rule, reference=ref, clip_factor=clip, info=info)
    assert np.array_equal(np.concatenate([g.ravel() for g in got]), robust._finite_f32(want))
    assert info["rule"] == rule and info["num_devices"] == 6 and (("clip_bound" in info) == (clip is not None))
