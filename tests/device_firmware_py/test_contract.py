"""The wire contract: topics, every message round-trips, every rejection has its stable reason."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from device_firmware_py.contract import (
    REASONS,
    Assignment,
    ContractError,
    DeviceStatus,
    PredictAnswer,
    PredictRequest,
    Progress,
    Result,
    ResultVerdict,
    RoundStatus,
    ServerStatus,
    TrainingPlan,
    codec,
    decode,
    decode_for_topic,
    encode,
    payload_digest,
    topics,
)

RNG = np.random.default_rng(0)


def sample_messages() -> list:
    """One fully populated instance of every message type (also used by the AsyncAPI test)."""
    logits = (RNG.standard_normal((50, 10)) * 4).astype(np.float32)
    weights = [RNG.standard_normal((3, 3, 1, 8)).astype(np.float32), RNG.standard_normal(8).astype(np.float32)]
    digest = hashlib.sha256(b"proxy").hexdigest()
    return [
        DeviceStatus("dev-1", "online", "cnn_small", [28, 28, 1], "litert-2.3.0", 600, [60] * 10, {"train": True, "sigs": ["train", "distill"]}),
        DeviceStatus("dev-1", "offline"),
        Progress("dev-1", 4, "distill", step=10, total=100, loss=0.25),
        RoundStatus(4, "collecting", "koala_hetero", ["dev-1", "dev-2"], 1, 1, 0, 1.7e9, {"acc": 0.8}),
        RoundStatus(5, "failed", error="quorum not reached"),
        ServerStatus("online", "0.1.0", 4, {"shared_subscriptions": True}),
        ServerStatus("offline"),
        ResultVerdict("dev-1", "rejected", 4, "stale_version"),
        ResultVerdict("dev-1", "accepted", 4),
        ResultVerdict("dev-1", "rejected", None, "bad_magic"),
        PredictRequest.from_array("dev-1", "r00000001", RNG.random((2, 28, 28, 1)), "float16"),
        PredictRequest.from_array("dev-1", "r2", RNG.random((1, 8, 8, 1)), "float32"),
        PredictAnswer("dev-1", "r2", "ok", [3], [[0.1, 0.2, 0.05, 0.65]], 7),
        PredictAnswer("dev-1", "r3", "unavailable", reason="no large model yet"),
        Assignment(4, "dev-1", "cnn_small", 3, TrainingPlan(lr=1e-3, local_epochs=1, upload=("logits",), seed=7), 1.7e9,
                   digest, logits, np.arange(0, 100, 2), None),
        Assignment(4, "dev-1", "cnn_small", 3, TrainingPlan(task="fedavg_small", upload=("weights",)), weights=weights),
        Assignment(4, "dev-1", "cnn_small", 0, TrainingPlan(task="local_only", upload=())),
        Result(4, "dev-1", "cnn_small", 600, 3, [60] * 10, {"train_loss": 0.3}, digest, logits, weights),
        Result(4, "dev-1", "cnn_small", 600),
    ]


def same(a, b, atol=0.0) -> bool:
    return a.equals(b, atol) if hasattr(a, "equals") else a == b


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg):
    data = encode(msg)
    back = decode(data, type(msg))
    # float16 logits: relative precision ~1e-3 of |x| <= ~16 here
    assert same(msg, back, atol=0.02)


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("float16", 0.02), ("int8", 0.2)])
def test_tensor_wire_dtypes(dtype, atol):
    r = sample_messages()[-2]
    back = decode(encode(r, logits_dtype=dtype, weights_dtype=dtype))
    assert r.equals(back, atol)


def test_logits_sizes_5000x10():
    """5000 x 10 logits: float16 ~100 KB, int8 ~50 KB (header ~0.4 KB)."""
    x = RNG.standard_normal((5000, 10)).astype(np.float32)
    r = Result(1, "d1", "cnn_small", 10, proxy_logits=x)
    assert 100_000 < len(encode(r)) < 101_000
    assert 50_000 < len(encode(r, logits_dtype="int8")) < 51_000
    assert 200_000 < len(encode(r, logits_dtype="float32")) < 201_000


def test_topics_and_parsing():
    assert topics.device_status("d1") == "koala/v1/devices/d1/status"
    assert topics.device_assign("d1") == "koala/v1/devices/d1/down/assign"
    assert topics.device_result("d1") == "koala/v1/devices/d1/up/result"
    assert topics.device_progress("d1") == "koala/v1/devices/d1/up/progress"
    assert topics.round_status(7) == "koala/v1/rounds/7/status"
    assert topics.rounds_current() == "koala/v1/rounds/current"
    assert topics.server_status() == "koala/v1/server/status"
    assert topics.shared("workers", topics.filter_results()) == "$share/workers/koala/v1/devices/+/up/result"
    assert topics.shared(None, topics.filter_results()) == topics.filter_results()
    for kind, build in topics.BUILDERS.items():
        args = ("dev.7",) if "{device_id}" in topics.SPECS[kind].template else (12,) if "{round_id}" in topics.SPECS[kind].template else ()
        parsed = topics.parse_topic(build(*args))
        assert parsed.kind == kind
        assert parsed.device_id == (args[0] if args and isinstance(args[0], str) else None)


@pytest.mark.parametrize(
    "topic",
    ["koala/v1/devices/+/status", "koala/v1/devices/#", "koala/v2/devices/d1/status", "koala/v1/devices//status",
     "koala/v1/devices/d1/up/other", "koala/v1/rounds/01/status", "koala/v1/rounds/x/status", "other", "",
     "koala/v1/devices/d 1/status", "koala/v1/devices/$sys/status", "koala/v1/rounds/99999999999999999999/status"],
)
def test_bad_topics_rejected(topic):
    with pytest.raises(ContractError) as e:
        topics.parse_topic(topic)
    assert e.value.reason in ("bad_topic", "bad_device_id")


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "$x", "x" * 65, "é", None, 5])
def test_bad_device_ids(bad):
    with pytest.raises(ContractError) as e:
        topics.device_status(bad)
    assert e.value.reason == "bad_device_id"


def test_acl_helpers_cover_own_topics_only():
    pub = topics.acl_device_publish("d1")
    assert topics.device_result("d1") in pub and all("/d1/" in t for t in pub)
    assert "koala/v1/devices/d1/down/#" in topics.acl_device_read("d1")


def _frame(header: dict, body: bytes, magic=b"KOAL", version=codec.FRAME_VERSION, kind=2) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack(">4sBBHI", magic, version, kind, 0, len(h)) + h + body


def _good_header(body: bytes, **over) -> dict:
    h = {"round_id": 1, "device_id": "d1", "model_version": 0, "weights": None,
         "meta": {"arch": "a", "num_samples": 1, "label_histogram": None, "metrics": {}, "proxy_digest": None},
         "tensors": [{"name": "proxy_logits", "dtype": "float16", "shape": [2, 2]}],
         "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
    h.update(over)
    return h


def test_hand_built_frame_decodes():
    body = np.arange(4, dtype="<f2").tobytes()
    r = decode(_frame(_good_header(body), body))
    assert isinstance(r, Result) and r.proxy_logits.tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda b: _frame(_good_header(b), b, magic=b"XXXX"), "bad_json"),  # not a frame: parsed as JSON
        (lambda b: _frame(_good_header(b), b, version=9), "bad_version"),
        (lambda b: _frame(_good_header(b), b, version=1), "bad_version"),  # frame v1 (free-form hyper) is refused
        (lambda b: _frame(_good_header(b), b, kind=7), "bad_kind"),
        (lambda b: _frame(_good_header(b, body_sha256="0" * 64), b), "bad_digest"),
        (lambda b: _frame(_good_header(b), b[:-1]), "bad_shape"),
        (lambda b: _frame(_good_header(b, tensors=[{"name": "proxy_logits", "dtype": "float16", "shape": [3, 2]}]), b), "bad_shape"),
        (lambda b: _frame(_good_header(b, tensors=[{"name": "proxy_logits", "dtype": "float64", "shape": [1]}]), b), "bad_dtype"),
        (lambda b: _frame(_good_header(b, tensors=[{"name": "evil", "dtype": "float16", "shape": [2, 2]}]), b), "bad_header"),
        (lambda b: _frame(_good_header(b, device_id="a/b"), b), "bad_device_id"),
        (lambda b: _frame(_good_header(b, round_id=-1), b), "bad_field"),
        (lambda b: _frame(_good_header(b, meta={"arch": "a"}), b), "bad_field"),
        (lambda b: _frame({"x": 1}, b"")[:15], "bad_header"),
    ],
)
def test_frame_rejections(make, reason):
    body = np.arange(4, dtype="<f2").tobytes()
    with pytest.raises(ContractError) as e:
        decode(make(body))
    assert e.value.reason == reason


def test_nan_inf_rejected_on_both_sides():
    body = np.array([0, np.nan, 1, np.inf], dtype="<f2").tobytes()
    with pytest.raises(ContractError) as e:
        decode(_frame(_good_header(body), body))
    assert e.value.reason == "nan_or_inf"
    with pytest.raises(ContractError) as e:
        Result(1, "d1", "a", 1, proxy_logits=np.array([[np.nan]], dtype=np.float32))
    assert e.value.reason == "nan_or_inf"
    big = Result(1, "d1", "a", 1, proxy_logits=np.array([[1e6]], dtype=np.float32))
    with pytest.raises(ContractError) as e:
        encode(big)  # float16 overflow must not silently become inf
    assert e.value.reason == "nan_or_inf"
    assert decode(encode(big, logits_dtype="float32")).proxy_logits[0, 0] == 1e6
    with pytest.raises(ContractError) as e:
        decode(b'{"v":1,"type":"progress","device_id":"d","round_id":1,"phase":"x","loss":NaN}')
    assert e.value.reason == "nan_or_inf"


def test_oversize():
    r = Result(1, "d1", "a", 1, proxy_logits=np.zeros((1000, 10), np.float32))
    data = encode(r)
    with pytest.raises(ContractError) as e:
        decode(data, max_bytes=len(data) - 1)
    assert e.value.reason == "oversize"
    with pytest.raises(ContractError) as e:
        encode(r, max_bytes=1000)
    assert e.value.reason == "oversize"
    with pytest.raises(ContractError) as e:
        RoundStatus(1, "collecting", participants=[f"d{i}" for i in range(10_001)])
    assert e.value.reason == "oversize"


def test_control_rejections():
    cases = {
        b"\xff\xfe": "bad_json",
        b"[1]": "bad_json",
        b'{"type":"progress"}': "bad_version",
        b'{"v":1,"type":"nope"}': "bad_kind",
        b'{"v":1,"type":"progress","device_id":"d"}': "bad_field",
        b'{"v":1,"type":"progress","device_id":"d","round_id":1,"phase":"x","extra":1}': "bad_field",
        b'{"v":1,"type":"device_status","device_id":"d","state":"zombie"}': "bad_field",
        b'{"v":1,"type":"device_status","device_id":"d","num_samples":true}': "bad_field",
        b"[" * 100_000: "bad_json",
    }
    for payload, reason in cases.items():
        with pytest.raises(ContractError) as e:
            decode(payload)
        assert e.value.reason == reason, payload[:60]


def test_decode_for_topic_checks_spoofing_and_round():
    s = encode(DeviceStatus("dev-1"))
    parsed, msg = decode_for_topic(topics.device_status("dev-1"), s)
    assert parsed.device_id == "dev-1" and isinstance(msg, DeviceStatus)
    with pytest.raises(ContractError) as e:
        decode_for_topic(topics.device_status("dev-2"), s)
    assert e.value.reason == "spoofed_device"
    with pytest.raises(ContractError) as e:
        decode_for_topic(topics.device_result("dev-1"), s)  # a status where a result belongs
    assert e.value.reason == "bad_kind"
    with pytest.raises(ContractError) as e:
        decode_for_topic(topics.round_status(2), encode(RoundStatus(3, "created")))
    assert e.value.reason == "wrong_round"


def test_payload_digest_is_idempotency_key():
    a = encode(Result(1, "d1", "a", 1))
    assert payload_digest(a) == payload_digest(bytes(a)) and len(payload_digest(a)) == 64


def test_reasons_are_stable():
    with pytest.raises(AssertionError):
        ContractError("no_such_reason")
    assert {"bad_digest", "nan_or_inf", "oversize", "bad_shape", "wrong_round", "unknown_device", "spoofed_device",
            "stale_version", "plan_mismatch", "bad_histogram", "out_of_bounds"} <= REASONS
    assert codec.WIRE_DTYPES == ("float32", "float16", "int8", "int32")
    assert codec.FRAME_VERSION == 2


def test_one_message_model_engine_wire_device():
    """The engine, the wire and the device share one Assignment/Result (no mirror types to map)."""
    import device_firmware_py.task as task
    from server_app.engine import types

    assert task.Assignment is types.Assignment is Assignment
    assert task.Result is types.Result is Result
    assert not hasattr(task, "DeviceResult")


def test_assignment_frame_round_trip_with_plan_and_proxy_indices():
    logits = RNG.standard_normal((20, 10)).astype(np.float32)
    idx = np.arange(3, 63, 3)  # 20 sorted rows of the proxy set
    plan = TrainingPlan(task="koala", local_epochs=3, lr=2e-3, fkd_epochs=2, fkd_lr=5e-4, post_fkd_epochs=1,
                        temperature=2.0, batch=16, upload=("logits", "weights"), seed=123)  # fmt: skip
    a = Assignment(3, "d1", "cnn_small", 2, plan, deadline=1030.0, proxy_digest="ab" * 32, teacher_logits=logits,
                   proxy_indices=idx, weights=[np.ones(4, np.float32)])  # fmt: skip
    assert a.task == "koala"
    data = encode(a, logits_dtype="float32")
    hdr = codec.peek_header(data)
    assert hdr["meta"]["plan"] == plan.to_wire() and "hyper" not in hdr["meta"] and "task" not in hdr["meta"]
    assert {"name": "proxy_indices", "dtype": "int32", "shape": [20]} in hdr["tensors"]
    back = decode(data, Assignment)
    assert back.equals(a) and back.plan == plan and back.deadline == 1030.0
    assert back.proxy_indices.dtype.kind == "i" and back.proxy_indices.tolist() == idx.tolist()
    assert np.array_equal(back.teacher_logits, logits)
    r = Result(3, "d1", "cnn_small", 50, 2, [5] * 10, {"train_loss": 0.1}, "ab" * 32, logits, [np.ones(4, np.float32)])
    rb = decode(encode(r, logits_dtype="float32"), Result)
    assert rb.equals(r) and rb.model_version == 2 and rb.label_histogram == [5] * 10


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("float16", 2), ("int8", 1)])
def test_plan_logits_dtype_is_what_the_device_uploads(dtype, itemsize):
    """The plan asks for a wire dtype; the device's encoder sends the logits in it; the server decodes
    any of them back to float32 (int8 within half a quantization step of the per-tensor scale)."""
    plan = TrainingPlan(logits_dtype=dtype)
    back = decode(_assignment_frame_with_plan(plan.to_wire()))
    assert back.plan.logits_dtype == dtype
    logits = (RNG.standard_normal((500, 10)) * 4).astype(np.float32)
    r = Result(3, "d1", "cnn_small", 50, proxy_logits=logits)
    data = encode(r, logits_dtype=back.plan.logits_dtype)
    desc = codec.peek_header(data)["tensors"][0]
    assert desc["dtype"] == dtype and desc["shape"] == [500, 10]
    assert len(data) - len(encode(Result(3, "d1", "cnn_small", 50))) >= 500 * 10 * itemsize
    got = decode(data, Result).proxy_logits
    assert got.dtype == np.float32
    step = desc.get("scale", 0.0)
    assert np.max(np.abs(got - logits)) <= (step / 2 + 1e-6 if dtype == "int8" else 0.01)


def _assignment_frame_with_plan(plan: dict) -> bytes:
    """A well-formed assignment frame whose header's plan is replaced by `plan` (digest still valid)."""
    data = encode(Assignment(1, "d1", "cnn_small"))
    hdr = codec.peek_header(data)
    hdr["meta"]["plan"] = plan
    return _frame(hdr, b"", kind=1)


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"kd_epochs": 3}, "bad_field"),  # unknown key (an old/newer contract's name)
        ({"version": 2}, "bad_version"),
        ({"version": None}, "bad_version"),
        ({"upload": "logits"}, "bad_field"),  # a string is not a list
        ({"upload": ["logits", "gradients"]}, "bad_field"),
        ({"upload": ["logits", "logits"]}, "bad_field"),
        ({"task": "koala_v2"}, "bad_field"),
        ({"lr": 0.0}, "bad_field"),
        ({"local_epochs": -1}, "bad_field"),
        ({"local_epochs": 1.5}, "bad_field"),
        ({"local_epochs": True}, "bad_field"),
        ({"logits_dtype": "float64"}, "bad_field"),
        ({"logits_dtype": "int32"}, "bad_field"),  # int32 is the wire dtype of indices, not of logits
        ({"logits_dtype": None}, "bad_field"),
    ],
)
def test_bad_plans_refused(change, reason):
    plan = {**TrainingPlan().to_wire(), **change}
    with pytest.raises(ContractError) as e:
        decode(_assignment_frame_with_plan(plan))
    assert e.value.reason == reason
    with pytest.raises(ContractError) as e:
        TrainingPlan.from_wire(plan)
    assert e.value.reason == reason
    assert decode(_assignment_frame_with_plan(TrainingPlan().to_wire())).plan == TrainingPlan()


def test_assignment_field_checks():
    with pytest.raises(ContractError) as e:  # teacher rows must match the proxy subset
        Assignment(1, "d1", "a", teacher_logits=np.zeros((3, 10), np.float32), proxy_indices=np.arange(4))
    assert e.value.reason == "bad_shape"
    for bad in (np.array([3, 1, 2]), np.array([1, 1, 2]), np.array([-1, 2])):
        with pytest.raises(ContractError) as e:
            Assignment(1, "d1", "a", proxy_indices=bad)
        assert e.value.reason == "bad_field"
    with pytest.raises(ContractError) as e:
        Assignment(1, "d1", "a", proxy_indices=np.array([0.5, 1.0]))
    assert e.value.reason == "bad_dtype"
    with pytest.raises(ContractError) as e:
        Assignment(1, "d1", "a", plan={"task": "koala"})  # a plan dict needs its version
    assert e.value.reason == "bad_version"
    for removed in ("hyper", "deadline_s", "task"):
        with pytest.raises(TypeError):
            Assignment(1, "d1", "a", **{removed: None})


def test_frame_digest_binds_header_and_body_and_peek_header_is_lenient():
    """The submission idempotency key hashes prefix+header only; the header's body_sha256 makes it
    change with any body change, and equal frames (QoS 1 duplicates) give equal keys."""
    logits = (RNG.standard_normal((50, 10)) * 4).astype(np.float32)
    a = encode(Result(4, "dev-1", "cnn_small", 600, 3, [60] * 10, {}, None, logits))
    b = encode(Result(4, "dev-1", "cnn_small", 600, 3, [60] * 10, {}, None, logits + 1.0))
    assert codec.frame_digest(a) == codec.frame_digest(bytes(a)) != codec.frame_digest(b)
    assert codec.frame_digest(a) != payload_digest(a)
    assert codec.frame_digest(b"not a frame") == payload_digest(b"not a frame")
    assert codec.peek_header(a)["round_id"] == 4
    tampered = a[:-1] + bytes([a[-1] ^ 1])  # body changed under the same header: decode must refuse it
    assert codec.peek_header(tampered)["round_id"] == 4
    with pytest.raises(ContractError) as e:
        decode(tampered)
    assert e.value.reason == "bad_digest"
    for junk in (b"", b"KOAL", b"KOAL" + b"\xff" * 20, b"{}"):
        assert codec.peek_header(junk) is None
