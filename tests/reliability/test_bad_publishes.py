"""Bad input over real MQTT: raw paho publishes to the server's broker while a round collects.

The server is the real `ServerServices` in this process (so the test can look at the large model's
parameters); three simulated devices are assigned round 0 and hold their answers back while a raw
paho client publishes truncated, oversized, wrong-dtype, wrong-shape, NaN/Inf, wrong-round,
unknown-device, replayed and spoofed-device-id payloads. Every one must end as a rejection with
its stable reason in the events table (replays of an accepted submission are counted once), the
server must stay up, the large model must not move, and the devices' later valid results must
still be accepted and folded in.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import torch
from rel_helpers import RawPublisher, server_options, wait_for
from rel_simdev import SimFleet, canned_logits, result_frame

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.errors import REASONS

DEVS = ["good0", "good1", "good2"]


def reframe(frame: bytes, edit_header=None, body: bytes | None = None, fix_digest: bool = True) -> bytes:
    """Re-pack a valid frame with an edited header and/or body (digest recomputed unless told not)."""
    _, header, old_body = codec.read_frame_header(frame)
    body = bytes(old_body) if body is None else body
    if edit_header is not None:
        edit_header(header)
    header["body_len"] = len(body)
    if fix_digest:
        header["body_sha256"] = hashlib.sha256(body).hexdigest()
    h = json.dumps(header).encode()
    return struct.pack(">4sBBHI", b"KOAL", codec.FRAME_VERSION, 2, 0, len(h)) + h + body


def bad_payloads(valid: cm.Assignment, dev: str) -> list[tuple[str, str, bytes, set[str]]]:
    """(name, topic, payload, acceptable reasons) for every kind of bad input the issue lists."""
    good = result_frame(dev, valid)
    t = topics.device_result(dev)
    p, c = valid.teacher_logits.shape if valid.teacher_logits is not None else (200, 10)
    nan_body = canned_logits((p, c)).astype("<f2")
    nan_body[3, 4] = np.nan
    inf_body = canned_logits((p, c)).astype("<f4")
    inf_body[0, 0] = np.inf

    def f32(h):  # float32 description of the same logits
        h["tensors"][0]["dtype"] = "float32"

    def other(**kw):
        return result_frame(dev, cm.Assignment(**{**{k: getattr(valid, k) for k in ("round_id", "device_id", "arch",
                                                  "model_version", "proxy_digest")}, **kw}))  # fmt: skip

    def result(**kw):  # a well-formed result of `dev` for `valid`, with `kw` changed
        return codec.encode_frame(cm.Result(**{"round_id": valid.round_id, "device_id": dev, "arch": "cnn_small",
                                               "num_samples": 10, "model_version": valid.model_version,
                                               "label_histogram": [1] * c, "proxy_digest": valid.proxy_digest,
                                               "proxy_logits": canned_logits((p, c)), **kw}))  # fmt: skip

    wrong_shape = result(proxy_logits=canned_logits((p, c - 1)))
    spoof = result_frame("good1", valid)  # payload says good1, topic says `dev`
    return [
        ("truncated", t, good[: len(good) // 2], {"bad_shape", "bad_header", "bad_digest"}),
        ("prefix-only", t, good[:10], {"bad_magic"}),
        ("garbage", t, b"\x00\xffnot a frame at all" * 3, {"bad_magic", "bad_json"}),
        ("oversized-header", t, reframe(good, lambda h: h["meta"].update(pad="x" * 1000) or h.update(
            junk="y" * (300 * 1024))), {"oversize"}),  # fmt: skip
        ("oversized-columns", t, reframe(good, lambda h: h["tensors"][0].update(shape=[1, 20000]),
                                         body=b"\x00" * 40000), {"oversize", "bad_shape"}),  # fmt: skip
        ("wrong-dtype", t, reframe(good, lambda h: h["tensors"][0].update(dtype="float64")), {"bad_dtype"}),
        ("dtype-size-mismatch", t, reframe(good, f32), {"bad_shape"}),
        ("bad-digest", t, reframe(good, lambda h: None, body=bytes(codec.read_frame_header(good)[2])[::-1],
                                  fix_digest=False), {"bad_digest"}),  # fmt: skip
        ("wrong-shape", t, wrong_shape, {"bad_shape"}),
        ("nan", t, reframe(good, body=nan_body.tobytes()), {"nan_or_inf"}),
        ("inf", t, reframe(good, f32, body=inf_body.tobytes()), {"nan_or_inf"}),
        ("wrong-round", t, other(round_id=valid.round_id + 7), {"wrong_round"}),
        ("wrong-proxy", t, other(proxy_digest="0" * 64), {"bad_digest"}),
        ("stale-version", t, other(model_version=valid.model_version + 5), {"stale_version"}),
        ("bad-histogram", t, result(label_histogram=[2] * c), {"bad_histogram"}),  # sums to 20, num_samples 10
        ("unasked-weights", t, result(weights=[np.zeros(4, np.float32)]), {"plan_mismatch"}),
        ("huge-logits", t, result(proxy_logits=canned_logits((p, c)) * 500), {"out_of_bounds"}),
        ("spoofed-device-id", t, spoof, {"spoofed_device"}),
        ("unknown-device", topics.device_result("intruder"), result_frame("intruder", valid), {"wrong_round",
                                                                                                "unknown_device"}),
        ("bad-status-json", topics.device_status(dev), b"{not json", {"bad_json"}),
        ("spoofed-status", topics.device_status(dev),
         codec.encode_control(cm.DeviceStatus(device_id="good1", state="offline")), {"spoofed_device"}),
    ]  # fmt: skip


def large_state(services) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in services.orchestrator.strategy.large_model.state_dict().items()}


def test_raw_bad_publishes_are_rejected_recorded_and_never_folded_in(broker, digits_files, tmp_path, inproc_server,
                                                                    db_reader):
    db_url = f"sqlite:///{tmp_path / 'koala.db'}"
    hold = {"on": True}
    fleet = SimFleet("127.0.0.1", broker.port, DEVS, behaviour=lambda d, r: "silent" if hold["on"] else "answer")
    fleet.start()
    # this test spends 19 bad messages on good0's topic: above the per-device result budget (8 per
    # round, dropped before decoding: tests/reliability/test_flood.py) and the ingestor's limit
    services = inproc_server(server_options(db_url, tmp_path / "server", digits_files, broker.port, rounds=1,
                                            min_devices=3, deadline_s=300.0, quorum_fraction=1.0,
                                            budgets={"results_per_round": 100}))  # fmt: skip
    services.ingestor.max_results_per_round = 100
    db = db_reader(db_url)
    raw = RawPublisher("127.0.0.1", broker.port)
    try:
        wait_for(lambda: all((d, 0) in fleet.assigned for d in DEVS), 120, "round 0 assignments")
        before = large_state(services)
        cases = bad_payloads(fleet.assigned[("good0", 0)], "good0")
        # results are recorded by the batching ingest worker, status messages on the MQTT thread:
        # their relative order is not kept, so the status cases go out once the results' are in
        n_results = sum(1 for _n, topic, _p, _ok in cases if topic.endswith("/result"))
        for i, (_name, topic, payload, _ok) in enumerate(cases):
            if i == n_results:
                wait_for(lambda: len(db.rejections()) >= n_results, 60, "result rejections recorded")
            raw.publish(topic, payload)
        rej = wait_for(lambda: (r := db.rejections()) and len(r) >= len(cases) and r, 60, "every rejection recorded")
        # --- every bad publish became exactly one recorded rejection with an expected reason
        assert len(rej) == len(cases), [r["reason"] for r in rej]
        for (name, _t, _p, ok), r in zip(cases, rej, strict=True):
            assert r["reason"] in ok, (name, r)
            assert r["reason"] in REASONS
        # --- the large model did not move; the server is alive and still collecting round 0
        after = large_state(services)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert services.orchestrator.alive and services.link.connected.is_set()
        assert db.rounds()[0].state == "collecting"
        # --- the devices' valid answers (incl. good0, whose topic carried the garbage) are still taken
        good_frames = {d: fleet.answer(d, 0) for d in DEVS}
        wait_for(lambda: db.rounds()[0].state in ("completed", "failed"), 120, "round 0 to finish")
        # --- a replay of an accepted submission is counted once, not twice, and not as a rejection
        raw.publish(topics.device_result("good2"), good_frames["good2"])
        wait_for(lambda: services.ingestor.counts["duplicate"] >= 1, 30, "replay to be seen")
    finally:
        raw.close()
        fleet.stop()
    r0 = db.rounds()[0]
    assert r0.state == "completed", r0.error
    rows = {a.device_id: a for a in db.assignments(0)}
    assert {d: rows[d].status for d in DEVS} == dict.fromkeys(DEVS, "accepted")
    assert "intruder" not in rows or rows["intruder"].status != "accepted"
    assert {d: rows[d].digest for d in DEVS} == {d: codec.frame_digest(f) for d, f in good_frames.items()}
    assert len(db.rejections()) == len(cases)
    final = services.orchestrator.strategy.large_model.state_dict()
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    counts = services.ingestor.counts
    print(f"\nRELIABILITY bad-mqtt: bad_published={len(cases)} rejected_recorded={len(rej)} "
          f"reasons={sorted({r['reason'] for r in rej})} valid_after={len(DEVS)} accepted={sum(1 for d in DEVS if rows[d].status == 'accepted')} "
          f"replay_duplicates={counts['duplicate']}")  # fmt: skip
