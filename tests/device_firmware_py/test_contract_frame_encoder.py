"""FrameEncoder (body encoded once per round) must produce exactly the bytes of the per-message encoder.

`_reference_encode_frame` is a frozen copy of `codec.encode_frame` as it was before the body cache
(commit 0f0168d), updated for frame version 2 (an assignment's `proxy_indices` travel as an int32
tensor after the teacher logits): if the wire bytes ever drift from it, these tests say so. Frames are also decoded
through the contract codec and compared field by field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest

from device_firmware_py.contract import Assignment, ContractError, Result, TrainingPlan, codec
from device_firmware_py.contract.messages import FRAME_MESSAGES


def _reference_encode_frame(
    msg: Assignment | Result, *, logits_dtype: str = "float16", weights_dtype: str = "float32"
) -> bytes:
    """The pre-FrameEncoder encode_frame, verbatim but for the max_bytes check (not exercised here)."""
    if msg.TYPE not in FRAME_MESSAGES:
        raise ContractError("bad_kind", "control message")
    msg.validate()
    main_name = {"assignment": "teacher_logits", "result": "proxy_logits"}[msg.TYPE]
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    main = getattr(msg, main_name)
    if main is not None:
        d, b = codec._to_wire(main_name, main, logits_dtype)
        tensors.append(d)
        chunks.append(b)
    if msg.TYPE == "assignment" and msg.proxy_indices is not None:
        d, b = codec._to_wire("proxy_indices", msg.proxy_indices, "int32")
        tensors.append(d)
        chunks.append(b)
    for i, w in enumerate(msg.weights or []):
        d, b = codec._to_wire(f"weights/{i}", w, weights_dtype)
        tensors.append(d)
        chunks.append(b)
    body = b"".join(chunks)
    meta = msg.scalar_fields()
    header = {
        "round_id": meta.pop("round_id"),
        "device_id": meta.pop("device_id"),
        "model_version": meta.pop("model_version"),
        "meta": meta,
        "weights": None if msg.weights is None else len(msg.weights),
        "tensors": tensors,
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return codec._PREFIX.pack(codec.MAGIC, codec.FRAME_VERSION, {"assignment": 1, "result": 2}[msg.TYPE], 0, len(hbytes)) + hbytes + body


RNG = np.random.default_rng(7)
TEACHER = (RNG.standard_normal((500, 10)) * 3).astype(np.float32)
WEIGHTS = [RNG.standard_normal((3, 3, 1, 8)).astype(np.float32), RNG.standard_normal(8).astype(np.float32)]
IDX = np.sort(RNG.choice(2000, 500, replace=False))  # the round's proxy subset (rows of TEACHER)


def _round(n: int, teacher: np.ndarray | None = TEACHER, weights: list[np.ndarray] | None = None,
           idx: np.ndarray | None = IDX) -> list[Assignment]:  # fmt: skip
    """One round's assignments as the KOALA strategy builds them: one shared teacher array and
    one shared proxy subset."""
    return [
        Assignment(round_id=3, device_id=f"dev-{i:05d}", arch="cnn_small" if i % 2 else "mlp_tiny", model_version=2,
                   plan=TrainingPlan(lr=0.01, seed=1000 + i, upload=("logits",)), deadline=1.8e9 + i,
                   proxy_digest="ab" * 32 if i % 3 else None, teacher_logits=teacher, proxy_indices=idx,
                   weights=weights)  # fmt: skip
        for i in range(n)
    ]


@pytest.mark.parametrize("logits_dtype", ["float16", "float32", "int8"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_encoder_bytes_equal_the_old_per_device_encoder(logits_dtype, with_weights):
    msgs = _round(7, weights=WEIGHTS if with_weights else None)
    enc = codec.FrameEncoder(logits_dtype=logits_dtype)
    for m in msgs:
        old = _reference_encode_frame(m, logits_dtype=logits_dtype)
        assert enc.encode(m) == old
        assert codec.encode_frame(m, logits_dtype=logits_dtype) == old
        head, body = enc.parts(m)
        assert head + body == old
        back = codec.decode_frame(old, Assignment)
        assert back.scalar_fields() == m.scalar_fields()
        assert back.equals(m, atol=0.05 if logits_dtype == "int8" else 5e-3)


def test_shared_body_is_converted_and_hashed_once(monkeypatch):
    calls = []
    real = codec._frame_body
    monkeypatch.setattr(codec, "_frame_body", lambda *a: calls.append(1) or real(*a))
    enc = codec.FrameEncoder()
    parts = [enc.parts(m) for m in _round(50, weights=WEIGHTS)]
    assert len(calls) == 1
    assert all(body is parts[0][1] for _head, body in parts)  # one body object shared by all frames
    assert len({head for head, _ in parts}) == 50  # headers differ (device id, seed, deadline)


def test_distinct_or_missing_tensors_are_not_confused():
    other = TEACHER + 1.0  # equal shape, different values, different object
    msgs = _round(2) + _round(2, teacher=other) + _round(2, teacher=None) + _round(1, teacher=TEACHER.astype(np.float16))
    enc = codec.FrameEncoder()
    frames = [enc.encode(m) for m in msgs]
    assert frames == [_reference_encode_frame(m) for m in msgs]
    digests = {json.loads(f[12 : 12 + codec._PREFIX.unpack_from(f)[4]])["body_sha256"] for f in frames}
    # TEACHER, other, no tensor; the float16 copy of TEACHER is a separate cache entry whose float16
    # wire bytes happen to equal TEACHER's
    assert len(digests) == 3
    assert len(enc._bodies) == 4


def test_results_share_a_body_too():
    logits = (RNG.standard_normal((40, 10))).astype(np.float32)
    msgs = [Result(round_id=1, device_id=f"d{i}", arch="cnn_small", num_samples=10 + i, proxy_logits=logits) for i in range(3)]
    enc = codec.FrameEncoder()
    assert [enc.encode(m) for m in msgs] == [_reference_encode_frame(m) for m in msgs]


def test_encoder_rejects_what_encode_frame_rejects():
    enc = codec.FrameEncoder()
    bad = _round(1)[0]
    bad.teacher_logits = np.full((len(IDX), 10), np.nan, dtype=np.float32)
    with pytest.raises(ContractError) as e:
        enc.encode(bad)
    assert e.value.reason == "nan_or_inf"
    overflow = _round(1)[0]
    overflow.teacher_logits = np.full((len(IDX), 10), 1e6, dtype=np.float32)
    with pytest.raises(ContractError) as e:
        enc.encode(overflow)
    assert e.value.reason == "nan_or_inf"  # float16 overflow, same as encode_frame
    with pytest.raises(ContractError) as e:
        codec.FrameEncoder(max_bytes=1000).encode(_round(1)[0])
    assert e.value.reason == "oversize"


def test_server_assignments_encode_like_before():
    """The fleet's path: the strategy's Assignments (the contract type; the fleet stamps deadline and
    proxy digest) straight into the encoder, shared teacher and proxy subset encoded once."""
    from server_app.engine.types import Assignment as EngineAssignment

    assert EngineAssignment is Assignment
    msgs = [Assignment(round_id=5, device_id=f"dev-{i}", arch="cnn_small", plan=TrainingPlan(upload=("logits",), seed=i),
                       teacher_logits=TEACHER, proxy_indices=IDX) for i in range(5)]  # fmt: skip
    enc = codec.FrameEncoder()
    for a in msgs:
        a.deadline, a.proxy_digest = 1.9e9, "cd" * 32
        assert enc.encode(a) == _reference_encode_frame(a)
    assert len(enc._bodies) == 1


def test_assignment_without_proxy_subset_has_no_index_tensor():
    (a,) = _round(1, idx=None)
    hdr = codec.peek_header(codec.encode_frame(a))
    assert [t["name"] for t in hdr["tensors"]] == ["teacher_logits"]
    assert codec.encode_frame(a) == _reference_encode_frame(a)
