"""Bytes <-> messages: JSON for control messages, binary tensor frames for assignments and results.

Why binary frames: teacher/proxy logits are the bulk of KOALA's traffic (5000 x 10 logits per device
per round); JSON numbers would cost ~4-5x the bytes and a slow parse on the device. Float16 keeps the
logits well within distillation precision at 2 bytes per value.

Frame layout (all integers big-endian, tensor data little-endian, MQTT 3.1.1 safe: nothing relies
on v5 properties):

    0   4  magic  b"KOAL"
    4   1  frame version (2; version-1 frames are refused as `bad_version`)
    5   1  kind (1 = assignment, 2 = result)
    6   2  reserved, 0
    8   4  header length H (<= MAX_HEADER_BYTES)
    12  H  header: UTF-8 JSON object {round_id, device_id, model_version, meta, weights,
           tensors: [{name, dtype, shape, scale?}], body_len, body_sha256}; an assignment's meta
           holds its `plan` (contract.plan.TrainingPlan, versioned on its own)
    12+H   body: the tensors' bytes, concatenated in header order

Decoding validates everything (sizes first, before any allocation) and raises ContractError with a
stable reason; any other exception escaping a decoder is a bug (hypothesis fuzzes for it).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any, overload

import numpy as np

from .errors import ContractError
from .messages import CONTROL_MESSAGES, FRAME_MESSAGES, Assignment, Message, Result
from .topics import ParsedTopic, parse_topic

MAGIC = b"KOAL"
FRAME_VERSION = 2  # 2: typed training plan + proxy_indices tensor (1: free-form `hyper` dict)
ENVELOPE_VERSION = 1
_PREFIX = struct.Struct(">4sBBHI")
KINDS = {1: "assignment", 2: "result"}
_KIND_IDS = {v: k for k, v in KINDS.items()}

MAX_HEADER_BYTES = 256 * 1024
MAX_CONTROL_BYTES = 1024 * 1024
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
WIRE_DTYPES = ("float32", "float16", "int8", "int32")  # allow-list; int8 carries a per-tensor scale
ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1, "int32": 4}  # bytes per element on the wire
_NP_DTYPE = {"float32": "<f4", "float16": "<f2", "int8": "i1", "int32": "<i4"}
# Named (non-weight) tensors of each frame kind, in body order, with their wire role:
# "logits" travel in the encoder's logits dtype, "index" always as int32.
_NAMED_TENSORS: dict[str, tuple[tuple[str, str], ...]] = {
    "assignment": (("teacher_logits", "logits"), ("proxy_indices", "index")),
    "result": (("proxy_logits", "logits"),),
}


# ---- JSON control messages ----------------------------------------------------------------------
def _reject_constant(c: str) -> None:
    raise ContractError("nan_or_inf", f"JSON constant {c} is not allowed")


def encode_control(msg: Message) -> bytes:
    """Control message -> compact UTF-8 JSON `{"v": 1, "type": ..., <fields>}`."""
    if msg.TYPE not in CONTROL_MESSAGES:
        raise ContractError("bad_kind", f"{msg.TYPE} is sent as a binary frame, use encode_frame")
    msg.validate()
    data = json.dumps(
        {"v": ENVELOPE_VERSION, "type": msg.TYPE, **msg.scalar_fields()}, separators=(",", ":"), allow_nan=False
    ).encode()
    if len(data) > MAX_CONTROL_BYTES:
        raise ContractError("oversize", f"control message of {len(data)} bytes > {MAX_CONTROL_BYTES}")
    return data


def _loads_object(data: bytes, what: str, reason: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except ContractError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ContractError(reason, f"{what} is not valid UTF-8 JSON: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise ContractError(reason, f"{what} must be a JSON object")
    return obj


def _build(cls: type[Message], fields_: dict[str, Any]) -> Message:
    try:
        return cls(**fields_)
    except TypeError as exc:  # missing / unexpected keyword: a schema violation, not a crash
        raise ContractError("bad_field", f"{cls.TYPE}: {exc}") from None


def decode_control(payload: bytes, expected: type[Message] | None = None) -> Message:
    """JSON bytes -> validated control message (of class `expected` when given)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ContractError("bad_json", "payload must be bytes")
    if len(payload) > MAX_CONTROL_BYTES:
        raise ContractError("oversize", f"control message of {len(payload)} bytes > {MAX_CONTROL_BYTES}")
    obj = _loads_object(bytes(payload), "control message", "bad_json")
    if obj.pop("v", None) != ENVELOPE_VERSION:
        raise ContractError("bad_version", f"envelope version must be {ENVELOPE_VERSION}")
    kind = obj.pop("type", None)
    cls = CONTROL_MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ContractError("bad_kind", f"unknown control message type {kind!r}")
    if expected is not None and cls is not expected:
        raise ContractError("bad_kind", f"expected {expected.TYPE}, got {kind}")
    return _build(cls, obj)


# ---- binary tensor frames -----------------------------------------------------------------------
def _to_wire(name: str, arr: np.ndarray, dtype: str) -> tuple[dict[str, Any], bytes]:
    desc: dict[str, Any] = {"name": name, "dtype": dtype, "shape": list(arr.shape)}
    if dtype == "int32":
        if arr.dtype.kind not in "iu" or (arr.size and (int(arr.min()) < -(2**31) or int(arr.max()) >= 2**31)):
            raise ContractError("bad_dtype", f"{name}: int32 on the wire needs integers within int32")
        return desc, np.asarray(arr).astype("<i4").tobytes()
    a = np.asarray(arr, dtype=np.float32)
    if dtype == "float32":
        out = a.astype("<f4")
    elif dtype == "float16":
        with np.errstate(over="ignore"):  # overflow is detected just below and refused
            out = a.astype("<f2")
        if not np.isfinite(out).all():
            raise ContractError("nan_or_inf", f"{name} overflows float16 (|x| > 65504); send float32")
    elif dtype == "int8":
        peak = float(np.max(np.abs(a))) if a.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        desc["scale"] = scale
        out = np.clip(np.rint(a / scale), -127, 127).astype(np.int8)
    else:
        raise ContractError("bad_dtype", f"{name}: wire dtype {dtype!r} not in {WIRE_DTYPES}")
    return desc, out.tobytes()


def encode_frame(
    msg: Assignment | Result,
    *,
    logits_dtype: str = "float16",
    weights_dtype: str = "float32",
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> bytes:
    """Assignment/Result -> binary frame. Logits default to float16, weights to float32."""
    return FrameEncoder(logits_dtype=logits_dtype, weights_dtype=weights_dtype, max_bytes=max_bytes).encode(msg)


class FrameEncoder:
    """Encodes many frames that carry the *same* tensors, converting and hashing each body once.

    Why: a KOALA round sends every device the same teacher logits (5000 x 10 -> 100 kB float16);
    only the small JSON header (device id, deadline, seed...) differs. `encode_frame` per device
    repeats the float16 conversion, the finiteness check and the sha256 of an identical body N
    times. Bodies are cached by the *identity* of the message's tensor objects (the arrays the
    caller passed, before validation), so a shared array is encoded once; different arrays are
    encoded separately even when equal. The bytes are exactly what `encode_frame` produces:
    `encode_frame` is this class with an empty cache.

    The cache holds references to the arrays it keyed on (an id cannot be reused while cached) and
    assumes they are not modified in place between calls — use one encoder per round.
    """

    def __init__(
        self,
        *,
        logits_dtype: str = "float16",
        weights_dtype: str = "float32",
        max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.logits_dtype, self.weights_dtype, self.max_bytes = logits_dtype, weights_dtype, max_bytes
        self._bodies: dict[tuple[Any, ...], tuple[list[dict[str, Any]], bytes, str, tuple[Any, ...]]] = {}

    def encode(self, msg: Assignment | Result) -> bytes:
        """The complete frame: prefix + header + body (one copy of the body)."""
        head, body = self.parts(msg)
        return head + body

    def parts(self, msg: Assignment | Result) -> tuple[bytes, bytes]:
        """(prefix + header, body): the frame is their concatenation. The body object is shared
        by every frame with the same tensors, so callers can size frames without building them."""
        if msg.TYPE not in FRAME_MESSAGES:
            raise ContractError("bad_kind", f"{msg.TYPE} is a control message, use encode_control")
        raw_named = tuple(getattr(msg, n) for n, _ in _NAMED_TENSORS[msg.TYPE])
        raw_weights = msg.weights
        key = (msg.TYPE, tuple(map(id, raw_named)), None if raw_weights is None else tuple(map(id, raw_weights)))
        msg.validate()  # per message: the scalar fields differ; tensors are checked (cheaply) again
        cached = self._bodies.get(key)
        if cached is None:
            tensors, body = _frame_body(msg, self.logits_dtype, self.weights_dtype)
            cached = (tensors, body, hashlib.sha256(body).hexdigest(), (raw_named, raw_weights))
            self._bodies[key] = cached
        tensors, body, digest, _refs = cached
        return _frame_head(msg, tensors, body, digest, self.max_bytes), body


def _frame_body(msg: Assignment | Result, logits_dtype: str, weights_dtype: str) -> tuple[list[dict[str, Any]], bytes]:
    """Tensor descriptors and the concatenated tensor bytes of a validated message."""
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, role in _NAMED_TENSORS[msg.TYPE]:
        arr = getattr(msg, name)
        if arr is not None:
            d, b = _to_wire(name, arr, "int32" if role == "index" else logits_dtype)
            tensors.append(d)
            chunks.append(b)
    for i, w in enumerate(msg.weights or []):
        d, b = _to_wire(f"weights/{i}", w, weights_dtype)
        tensors.append(d)
        chunks.append(b)
    return tensors, b"".join(chunks)


def _frame_head(msg: Assignment | Result, tensors: list[dict[str, Any]], body: bytes, digest: str, max_bytes: int) -> bytes:
    """Prefix + JSON header of a validated message whose body is `body` (sha256 `digest`)."""
    meta = msg.scalar_fields()
    header = {
        "round_id": meta.pop("round_id"),
        "device_id": meta.pop("device_id"),
        "model_version": meta.pop("model_version"),
        "meta": meta,
        "weights": None if msg.weights is None else len(msg.weights),
        "tensors": tensors,
        "body_len": len(body),
        "body_sha256": digest,
    }
    hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(hbytes) > MAX_HEADER_BYTES:
        raise ContractError("oversize", f"frame header of {len(hbytes)} bytes > {MAX_HEADER_BYTES}")
    total = _PREFIX.size + len(hbytes) + len(body)
    if total > max_bytes:
        raise ContractError("oversize", f"frame of {total} bytes > {max_bytes}")
    return _PREFIX.pack(MAGIC, FRAME_VERSION, _KIND_IDS[msg.TYPE], 0, len(hbytes)) + hbytes


def _shape(name: str, v: object) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 8:
        raise ContractError("bad_shape", f"{name}: shape must be a list of at most 8 ints")
    for d in v:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 2**31:
            raise ContractError("bad_shape", f"{name}: bad dimension {d!r}")
    return tuple(v)


def _from_wire(desc: object, body: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(desc, dict):
        raise ContractError("bad_header", "tensor descriptor must be an object")
    name, dtype = desc.get("name"), desc.get("dtype")
    if not isinstance(name, str):
        raise ContractError("bad_header", "tensor name missing")
    if dtype not in WIRE_DTYPES:
        raise ContractError("bad_dtype", f"{name}: dtype {dtype!r} not in {WIRE_DTYPES}")
    shape = _shape(name, desc.get("shape"))
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if offset + nbytes > len(body):
        raise ContractError("bad_shape", f"{name}: shape {shape} x {dtype} runs past the body")
    raw = np.frombuffer(body, dtype=_NP_DTYPE[dtype], count=math.prod(shape), offset=offset).reshape(shape)
    if dtype == "int32":
        return name, raw.astype(np.int64), offset + nbytes
    if dtype == "int8":
        scale = desc.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < 1e30):
            raise ContractError("bad_header", f"{name}: int8 tensor needs a finite positive scale")
        arr = raw.astype(np.float32) * np.float32(scale)
    else:
        arr = raw.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ContractError("nan_or_inf", f"{name} holds NaN or Inf")
    return name, arr, offset + nbytes


def read_frame_header(payload: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[str, dict[str, Any], memoryview]:
    """Check prefix, sizes and digest; return (kind, header, body). Cheap enough to run first."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ContractError("bad_magic", "payload must be bytes")
    if len(payload) > max_bytes:
        raise ContractError("oversize", f"frame of {len(payload)} bytes > {max_bytes}")
    if len(payload) < _PREFIX.size:
        raise ContractError("bad_magic", "payload shorter than the frame prefix")
    magic, version, kind_id, _reserved, hlen = _PREFIX.unpack_from(payload, 0)
    if magic != MAGIC:
        raise ContractError("bad_magic", f"magic {magic!r} != {MAGIC!r}")
    if version != FRAME_VERSION:
        raise ContractError("bad_version", f"frame version {version}; this side speaks {FRAME_VERSION} "
                                           "(update the older of device firmware and server)")
    kind = KINDS.get(kind_id)
    if kind is None:
        raise ContractError("bad_kind", f"unknown frame kind {kind_id}")
    if hlen > MAX_HEADER_BYTES:
        raise ContractError("oversize", f"header of {hlen} bytes > {MAX_HEADER_BYTES}")
    if _PREFIX.size + hlen > len(payload):
        raise ContractError("bad_header", "header runs past the payload")
    view = memoryview(payload)
    header = _loads_object(bytes(view[_PREFIX.size : _PREFIX.size + hlen]), "frame header", "bad_header")
    body = view[_PREFIX.size + hlen :]
    if header.get("body_len") != len(body):
        raise ContractError("bad_shape", f"body is {len(body)} bytes, header says {header.get('body_len')!r}")
    if header.get("body_sha256") != hashlib.sha256(body).hexdigest():
        raise ContractError("bad_digest", "sha256 of the body does not match the header")
    return kind, header, body


@overload
def decode_frame(payload: bytes, expected: type[Assignment], *, max_bytes: int = ...) -> Assignment: ...
@overload
def decode_frame(payload: bytes, expected: type[Result], *, max_bytes: int = ...) -> Result: ...
@overload
def decode_frame(payload: bytes, expected: type[Message] | None = None, *, max_bytes: int = ...) -> Assignment | Result: ...
def decode_frame(
    payload: bytes, expected: type[Message] | None = None, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Assignment | Result:
    """Binary frame -> validated Assignment/Result with float32 tensors."""
    kind, header, body = read_frame_header(payload, max_bytes)
    cls = FRAME_MESSAGES[kind]
    if expected is not None and cls is not expected:
        raise ContractError("bad_kind", f"expected {expected.TYPE}, got {kind}")
    descs = header.get("tensors")
    nweights = header.get("weights")
    meta = header.get("meta")
    if not isinstance(descs, list) or len(descs) > 4097 or not isinstance(meta, dict):
        raise ContractError("bad_header", "header needs a tensors list and a meta object")
    if nweights is not None and (isinstance(nweights, bool) or not isinstance(nweights, int) or nweights < 0):
        raise ContractError("bad_header", "weights must be null or a non-negative int")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for desc in descs:
        name, arr, offset = _from_wire(desc, body, offset)
        if name in tensors:
            raise ContractError("bad_header", f"tensor {name} appears twice")
        tensors[name] = arr
    if offset != len(body):
        raise ContractError("bad_shape", f"tensors cover {offset} of {len(body)} body bytes")
    named = {n: tensors.pop(n, None) for n, _ in _NAMED_TENSORS[kind]}
    weights = None
    if nweights is not None:
        try:
            weights = [tensors.pop(f"weights/{i}") for i in range(nweights)]
        except KeyError as exc:
            raise ContractError("bad_header", f"missing tensor {exc.args[0]}") from None
    if tensors:
        raise ContractError("bad_header", f"unexpected tensors {sorted(tensors)[:5]}")
    fields_ = {
        **meta,
        "round_id": header.get("round_id"),
        "device_id": header.get("device_id"),
        "model_version": header.get("model_version"),
        **named,
        "weights": weights,
    }
    if len(fields_) != len(meta) + 4 + len(named):
        raise ContractError("bad_header", "meta repeats a header field")
    return _build(cls, fields_)  # type: ignore[return-value]


# ---- dispatch -----------------------------------------------------------------------------------
def encode(msg: Message, **frame_options: Any) -> bytes:
    """Any message -> bytes (frame for Assignment/Result, JSON otherwise)."""
    if msg.TYPE in FRAME_MESSAGES:
        return encode_frame(msg, **frame_options)  # type: ignore[arg-type]
    return encode_control(msg)


def decode(payload: bytes, expected: type[Message] | None = None, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Any bytes -> a validated message, or ContractError. Never raises anything else."""
    try:
        if isinstance(payload, (bytes, bytearray, memoryview)) and bytes(payload[:4]) == MAGIC:
            return decode_frame(payload, expected, max_bytes=max_bytes)
        return decode_control(payload, expected)
    except ContractError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, MemoryError) as exc:
        # Safety net: a validation gap must still end as a recorded rejection, not a dead handler.
        raise ContractError("bad_field", f"undecodable message ({exc.__class__.__name__}: {exc})") from None


def decode_for_topic(
    topic: str, payload: bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[ParsedTopic, Message]:
    """Decode a delivered message and check it belongs on its topic.

    The device id in the topic is what the broker's ACL authenticated; a payload claiming another
    id is `spoofed_device`. A round status on rounds/{n}/status must be about round n.
    """
    from .topics import SPECS  # local: avoid a cycle in type checkers

    parsed = parse_topic(topic)
    expected = {c.__name__: c for c in (*CONTROL_MESSAGES.values(), *FRAME_MESSAGES.values())}[
        SPECS[parsed.kind].message
    ]
    msg = decode(payload, expected, max_bytes=max_bytes)
    if parsed.device_id is not None and getattr(msg, "device_id", None) != parsed.device_id:
        raise ContractError("spoofed_device", f"payload device {getattr(msg, 'device_id', None)!r} on topic of {parsed.device_id!r}")
    if parsed.round_id is not None and getattr(msg, "round_id", None) != parsed.round_id:
        raise ContractError("wrong_round", f"status of round {getattr(msg, 'round_id', None)} on topic of round {parsed.round_id}")
    return parsed, msg


def payload_digest(payload: bytes) -> str:
    """sha256 of a whole payload (QoS 1 duplicates are identical)."""
    return hashlib.sha256(payload).hexdigest()


def peek_header(payload: bytes) -> dict[str, Any] | None:
    """The JSON header of a frame-shaped payload *without* checking the body (None if unreadable).
    For audit records of frames that failed validation — never trust what it returns."""
    try:
        if len(payload) < _PREFIX.size:
            return None
        magic, _v, _k, _r, hlen = _PREFIX.unpack_from(payload, 0)
        if magic != MAGIC or hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(payload):
            return None
        return _loads_object(bytes(memoryview(payload)[_PREFIX.size : _PREFIX.size + hlen]), "frame header", "bad_header")
    except (ContractError, ValueError, TypeError):
        return None


def frame_digest(payload: bytes) -> str:
    """Idempotency key of a frame that passed `decode` (a submission's digest in the registry).

    sha256 over the prefix and header only: the header carries the body's sha256, which decoding
    checked, so this binds the whole frame — without hashing a 100 kB body a second time (the
    ingestion hot path). Payloads that are not frames fall back to `payload_digest`."""
    if len(payload) >= _PREFIX.size and bytes(payload[:4]) == MAGIC:
        hlen = _PREFIX.unpack_from(payload, 0)[4]
        if _PREFIX.size + hlen <= len(payload):
            return hashlib.sha256(memoryview(payload)[: _PREFIX.size + hlen]).hexdigest()
    return payload_digest(payload)
