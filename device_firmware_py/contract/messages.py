"""Schemas of every KOALA message: stdlib dataclasses that validate themselves on construction.

Why not pydantic: this module runs on the device (numpy + stdlib only). Validation is explicit and
raises ContractError with a stable reason, so a malformed message is refused and recorded, never
crashes a handler and never reaches the large model. The same checks run when a message is built
for sending and when one is decoded, so a peer can only send what the other side accepts.

Tensor fields hold numpy arrays (float32 after decoding); the wire dtype is the codec's business.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from .errors import ContractError
from .plan import TrainingPlan
from .topics import validate_device_id, validate_round_id

# ---- limits (part of the contract: both sides refuse anything beyond them) -------------------------
MAX_NAME_LEN = 64  # arch, task, phase, version strings, dict keys
MAX_TEXT_LEN = 1024  # free text (errors, capability strings)
MAX_CLASSES = 10_000  # label histogram length, logits columns
MAX_DICT_KEYS = 128  # metrics, capabilities
MAX_LIST_LEN = 256  # lists inside capabilities, input_shape
MAX_PARTICIPANTS = 10_000
MAX_WEIGHT_TENSORS = 4096
MAX_TENSOR_NDIM = 8
MAX_COUNT = 2**31 - 1  # sample counts, steps, histogram bins
MAX_PROXY = 10_000_000  # proxy-set size: bound of proxy_indices values and logits rows

DEVICE_STATES = ("online", "offline")
SERVER_STATES = ("online", "offline")
# Round state machine shared with the registry (server_app.registry) and monitors.
ROUND_STATES = ("created", "collecting", "aggregating", "completed", "failed", "aborted")
TERMINAL_ROUND_STATES = ("completed", "failed", "aborted")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,63}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


# ---- field checkers ------------------------------------------------------------------------------
def _bad(name: str, why: str) -> ContractError:
    return ContractError("bad_field", f"{name}: {why}")


def check_name(name: str, v: object, *, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise _bad(name, f"expected str, got {type(v).__name__}")
    if len(v) > MAX_NAME_LEN:
        raise ContractError("oversize", f"{name}: longer than {MAX_NAME_LEN}")
    if not _NAME_RE.fullmatch(v):
        raise _bad(name, f"{v!r} must match {_NAME_RE.pattern}")
    return v


def check_text(name: str, v: object, *, optional: bool = True) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise _bad(name, f"expected str, got {type(v).__name__}")
    if len(v) > MAX_TEXT_LEN:
        raise ContractError("oversize", f"{name}: longer than {MAX_TEXT_LEN}")
    return v


def check_int(name: str, v: object, lo: int = 0, hi: int = MAX_COUNT, *, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise _bad(name, f"expected int, got {type(v).__name__}")
    if not lo <= int(v) <= hi:
        raise _bad(name, f"{v} not in [{lo}, {hi}]")
    return int(v)


def check_float(
    name: str, v: object, lo: float = -math.inf, hi: float = math.inf, *, optional: bool = False
) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise _bad(name, f"expected number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ContractError("nan_or_inf", f"{name} is {f}")
    if not lo <= f <= hi:
        raise _bad(name, f"{f} not in [{lo}, {hi}]")
    return f


def check_choice(name: str, v: object, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise _bad(name, f"{v!r} not one of {choices}")
    return v


def check_int_list(
    name: str, v: object, max_len: int, lo: int = 0, hi: int = MAX_COUNT, *, optional: bool = True
) -> list[int] | None:
    if v is None and optional:
        return None
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise _bad(name, f"expected list, got {type(v).__name__}")
    if len(v) > max_len:
        raise ContractError("oversize", f"{name}: more than {max_len} entries")
    return [check_int(f"{name}[{i}]", x, lo, hi) for i, x in enumerate(v)]  # type: ignore[misc]


def _check_scalar(name: str, v: object) -> object:
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return check_int(name, v, -(2**63), 2**63 - 1)
    if isinstance(v, (float, np.floating)):
        return check_float(name, v)
    if isinstance(v, str):
        return check_text(name, v)
    raise _bad(name, f"expected a JSON scalar, got {type(v).__name__}")


def check_dict(name: str, v: object, *, allow_lists: bool = False) -> dict[str, Any]:
    """A flat dict of JSON scalars (optionally short lists of scalars): metrics, capabilities."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(name, f"expected dict, got {type(v).__name__}")
    if len(v) > MAX_DICT_KEYS:
        raise ContractError("oversize", f"{name}: more than {MAX_DICT_KEYS} keys")
    out: dict[str, Any] = {}
    for k, x in v.items():
        check_name(f"{name} key", k)
        if allow_lists and isinstance(x, (list, tuple)):
            if len(x) > MAX_LIST_LEN:
                raise ContractError("oversize", f"{name}[{k}]: more than {MAX_LIST_LEN} entries")
            out[k] = [_check_scalar(f"{name}[{k}][{i}]", y) for i, y in enumerate(x)]
        else:
            out[k] = _check_scalar(f"{name}[{k}]", x)
    return out


def check_digest(name: str, v: object, *, optional: bool = True) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not _DIGEST_RE.fullmatch(v):
        raise _bad(name, "expected 64 lowercase hex characters (sha256)")
    return v


def check_tensor(name: str, v: object, ndim: int | None = None, *, optional: bool = True) -> np.ndarray | None:
    """A finite real numpy array (int or float); returned as float32 so both sides compute alike."""
    if v is None and optional:
        return None
    if not isinstance(v, np.ndarray):
        raise _bad(name, f"expected numpy array, got {type(v).__name__}")
    if v.dtype.kind not in "fiu":
        raise ContractError("bad_dtype", f"{name}: dtype {v.dtype} is not a real number type")
    if ndim is not None and v.ndim != ndim:
        raise ContractError("bad_shape", f"{name}: expected {ndim} dimensions, got shape {v.shape}")
    if v.ndim > MAX_TENSOR_NDIM:
        raise ContractError("bad_shape", f"{name}: more than {MAX_TENSOR_NDIM} dimensions")
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        raise ContractError("nan_or_inf", f"{name} holds NaN or Inf")
    if ndim == 2 and v.shape[1] > MAX_CLASSES:
        raise ContractError("oversize", f"{name}: more than {MAX_CLASSES} columns")
    return v if v.dtype == np.float32 else v.astype(np.float32)


def check_weights(name: str, v: object) -> list[np.ndarray] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        raise _bad(name, f"expected list of arrays, got {type(v).__name__}")
    if len(v) > MAX_WEIGHT_TENSORS:
        raise ContractError("oversize", f"{name}: more than {MAX_WEIGHT_TENSORS} tensors")
    return [check_tensor(f"{name}[{i}]", w, optional=False) for i, w in enumerate(v)]  # type: ignore[misc]


def check_indices(name: str, v: object, *, optional: bool = True) -> np.ndarray | None:
    """A 1-D, strictly increasing array of non-negative integer indices (a subset of the proxy set)."""
    if v is None and optional:
        return None
    if not isinstance(v, np.ndarray):
        raise _bad(name, f"expected numpy array, got {type(v).__name__}")
    if v.dtype.kind not in "iu" and (
        v.dtype.kind != "f" or not np.isfinite(v).all() or not np.array_equal(v, np.rint(v))
    ):
        raise ContractError("bad_dtype", f"{name}: indices must be integers, got dtype {v.dtype}")
    if v.ndim != 1 or v.size == 0:
        raise ContractError("bad_shape", f"{name}: expected a non-empty 1-D array, got shape {v.shape}")
    # no copy when already int64: the frame encoder shares one body per round by array identity
    idx = v if v.dtype == np.int64 else v.astype(np.int64)
    if idx.min() < 0 or idx.max() >= MAX_PROXY:
        raise _bad(name, f"indices must lie in [0, {MAX_PROXY})")
    if idx.size > 1 and not bool(np.all(np.diff(idx) > 0)):
        raise _bad(name, "indices must be strictly increasing (sorted, no repeats)")
    return idx


# ---- messages ----------------------------------------------------------------------------------
class Message:
    """Base: TYPE is the wire name; validate() normalises fields in place or raises ContractError."""

    TYPE: ClassVar[str]
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def scalar_fields(self) -> dict[str, Any]:
        """Every non-tensor field, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.TENSOR_FIELDS}  # type: ignore[arg-type]


@dataclass(eq=False)
class DeviceStatus(Message):
    """Retained device state; `DeviceStatus(device_id, "offline")` is the Last Will."""

    TYPE: ClassVar[str] = "device_status"
    device_id: str
    state: str = "online"
    arch: str | None = None
    input_shape: list[int] | None = None  # [H, W, C]
    runtime_version: str | None = None
    num_samples: int | None = None
    label_histogram: list[int] | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def validate(self) -> None:
        validate_device_id(self.device_id)
        check_choice("state", self.state, DEVICE_STATES)
        self.arch = check_name("arch", self.arch, optional=True)
        self.input_shape = check_int_list("input_shape", self.input_shape, 8, 1, 65_536)
        self.runtime_version = check_name("runtime_version", self.runtime_version, optional=True)
        self.num_samples = check_int("num_samples", self.num_samples, optional=True)
        self.label_histogram = check_int_list("label_histogram", self.label_histogram, MAX_CLASSES)
        self.capabilities = check_dict("capabilities", self.capabilities, allow_lists=True)
        self.ts = check_float("ts", self.ts, 0.0)  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeviceStatus) and self.scalar_fields() == other.scalar_fields()


@dataclass(eq=False)
class Progress(Message):
    """Best-effort progress (QoS 0): phase, step, loss. Never needed for correctness."""

    TYPE: ClassVar[str] = "progress"
    device_id: str
    round_id: int
    phase: str  # e.g. "distill", "train", "logits", "upload"
    step: int = 0
    total: int | None = None
    loss: float | None = None
    ts: float = field(default_factory=time.time)

    def validate(self) -> None:
        validate_device_id(self.device_id)
        validate_round_id(self.round_id)
        check_name("phase", self.phase)
        self.step = check_int("step", self.step)  # type: ignore[assignment]
        self.total = check_int("total", self.total, optional=True)
        self.loss = check_float("loss", self.loss, optional=True)
        self.ts = check_float("ts", self.ts, 0.0)  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Progress) and self.scalar_fields() == other.scalar_fields()


VERDICTS = ("accepted", "duplicate", "rejected", "late", "ignored")


@dataclass(eq=False)
class ResultVerdict(Message):
    """Server -> device: the server's decision on one result message, so a device learns why a
    result was refused (`reason` is one of the contract's reject reasons) instead of guessing.
    Sent for every result whose device the server can tell from the topic; a `duplicate` is a QoS 1
    redelivery or re-publish of an accepted result and needs no action."""

    TYPE: ClassVar[str] = "result_verdict"
    device_id: str
    status: str  # accepted | duplicate | rejected | late | ignored
    round_id: int | None = None  # None when the payload could not be decoded far enough
    reason: str | None = None  # set when status is rejected (or late: "late")
    ts: float = field(default_factory=time.time)

    def validate(self) -> None:
        from .errors import REASONS

        validate_device_id(self.device_id)
        check_choice("status", self.status, VERDICTS)
        if self.round_id is not None:
            validate_round_id(self.round_id)
        if self.reason is not None:
            check_choice("reason", self.reason, tuple(sorted(REASONS)))
        self.ts = check_float("ts", self.ts, 0.0)  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResultVerdict) and self.scalar_fields() == other.scalar_fields()


@dataclass(eq=False)
class RoundStatus(Message):
    """Retained round state for monitors (rounds/{n}/status and rounds/current)."""

    TYPE: ClassVar[str] = "round_status"
    round_id: int
    state: str
    strategy: str | None = None
    participants: list[str] = field(default_factory=list)
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    deadline: float | None = None  # unix time
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    ts: float = field(default_factory=time.time)

    def validate(self) -> None:
        validate_round_id(self.round_id)
        check_choice("state", self.state, ROUND_STATES)
        self.strategy = check_name("strategy", self.strategy, optional=True)
        if not isinstance(self.participants, (list, tuple)):
            raise _bad("participants", "expected list of device ids")
        if len(self.participants) > MAX_PARTICIPANTS:
            raise ContractError("oversize", f"participants: more than {MAX_PARTICIPANTS}")
        self.participants = [validate_device_id(p) for p in self.participants]
        for n in ("received", "accepted", "rejected"):
            setattr(self, n, check_int(n, getattr(self, n)))
        self.deadline = check_float("deadline", self.deadline, 0.0, optional=True)
        self.metrics = check_dict("metrics", self.metrics)
        self.error = check_text("error", self.error)
        self.ts = check_float("ts", self.ts, 0.0)  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RoundStatus) and self.scalar_fields() == other.scalar_fields()


@dataclass(eq=False)
class ServerStatus(Message):
    """Retained server availability; `ServerStatus("offline")` is the server's Last Will."""

    TYPE: ClassVar[str] = "server_status"
    state: str = "online"
    version: str | None = None
    current_round: int | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def validate(self) -> None:
        check_choice("state", self.state, SERVER_STATES)
        self.version = check_name("version", self.version, optional=True)
        if self.current_round is not None:
            validate_round_id(self.current_round)
        self.capabilities = check_dict("capabilities", self.capabilities, allow_lists=True)
        self.ts = check_float("ts", self.ts, 0.0)  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServerStatus) and self.scalar_fields() == other.scalar_fields()


def _tensors_equal(a: np.ndarray | None, b: np.ndarray | None, atol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.allclose(a, b, atol=atol, rtol=0))


def metrics_clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-scalar, finite metrics only: a NaN loss of an empty epoch becomes None instead of
    voiding the whole result (the one finite-scalar cleaner; devices call it before sending)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            out[k] = v
        elif isinstance(v, (int, float, np.integer, np.floating)):
            f = float(v)
            out[k] = (int(v) if isinstance(v, (int, np.integer)) else f) if math.isfinite(f) else None
    return out


@dataclass(eq=False)
class Assignment(Message):
    """Server -> device: one round's work. THE assignment type: the engine, the wire and the device
    all use this class (no mirror elsewhere).

    `deadline` is absolute unix time (a relative deadline means nothing after a message sat in a
    broker queue); the engine leaves it None and the transport sets it when it dispatches.
    `proxy_indices` (int, sorted) selects this round's subset of the proxy set: the teacher logits
    and the expected result logits are on exactly these rows, in this order.
    """

    TYPE: ClassVar[str] = "assignment"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("teacher_logits", "proxy_indices", "weights")
    round_id: int
    device_id: str
    arch: str
    model_version: int = 0
    plan: TrainingPlan = field(default_factory=TrainingPlan)
    deadline: float | None = None  # unix time after which the server ignores the result
    proxy_digest: str | None = None  # sha256 of the proxy set the teacher logits are on
    teacher_logits: np.ndarray | None = None  # [P', C] on the round's proxy rows
    proxy_indices: np.ndarray | None = None  # [P'] int64, None = the whole proxy set
    weights: list[np.ndarray] | None = None

    def validate(self) -> None:
        validate_round_id(self.round_id)
        validate_device_id(self.device_id)
        check_name("arch", self.arch)
        self.model_version = check_int("model_version", self.model_version)  # type: ignore[assignment]
        self.plan = TrainingPlan.from_wire(self.plan)
        self.deadline = check_float("deadline", self.deadline, 0.0, optional=True)
        self.proxy_digest = check_digest("proxy_digest", self.proxy_digest)
        self.teacher_logits = check_tensor("teacher_logits", self.teacher_logits, 2)
        self.proxy_indices = check_indices("proxy_indices", self.proxy_indices)
        self.weights = check_weights("weights", self.weights)
        if (self.teacher_logits is not None and self.proxy_indices is not None
                and len(self.teacher_logits) != len(self.proxy_indices)):  # fmt: skip
            raise ContractError("bad_shape", f"teacher_logits has {len(self.teacher_logits)} rows for "
                                             f"{len(self.proxy_indices)} proxy_indices")

    @property
    def task(self) -> str:
        return self.plan.task

    def scalar_fields(self) -> dict[str, Any]:
        out = super().scalar_fields()
        out["plan"] = self.plan.to_wire()
        return out

    def equals(self, other: object, atol: float = 0.0) -> bool:
        """Field-wise equality, tensors within `atol` (float16 on the wire loses precision)."""
        return (
            isinstance(other, Assignment)
            and self.scalar_fields() == other.scalar_fields()
            and _tensors_equal(self.teacher_logits, other.teacher_logits, atol)
            and _tensors_equal(self.proxy_indices, other.proxy_indices, 0.0)
            and _weights_equal(self.weights, other.weights, atol)
        )


@dataclass(eq=False)
class Result(Message):
    """Device -> server: the knowledge a device publishes. THE result type (engine, wire, device).

    `proxy_logits` are on the assignment's proxy rows (all of them, or `proxy_indices`)."""

    TYPE: ClassVar[str] = "result"
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("proxy_logits", "weights")
    round_id: int
    device_id: str
    arch: str
    num_samples: int
    model_version: int = 0  # the assignment's model version this result answers
    label_histogram: list[int] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    proxy_digest: str | None = None  # echo of the assignment's proxy digest
    proxy_logits: np.ndarray | None = None  # [P, C]
    weights: list[np.ndarray] | None = None

    def validate(self) -> None:
        validate_round_id(self.round_id)
        validate_device_id(self.device_id)
        check_name("arch", self.arch)
        self.num_samples = check_int("num_samples", self.num_samples)  # type: ignore[assignment]
        self.model_version = check_int("model_version", self.model_version)  # type: ignore[assignment]
        self.label_histogram = check_int_list("label_histogram", self.label_histogram, MAX_CLASSES)
        self.metrics = check_dict("metrics", self.metrics)
        self.proxy_digest = check_digest("proxy_digest", self.proxy_digest)
        self.proxy_logits = check_tensor("proxy_logits", self.proxy_logits, 2)
        self.weights = check_weights("weights", self.weights)

    def equals(self, other: object, atol: float = 0.0) -> bool:
        return (
            isinstance(other, Result)
            and self.scalar_fields() == other.scalar_fields()
            and _tensors_equal(self.proxy_logits, other.proxy_logits, atol)
            and _weights_equal(self.weights, other.weights, atol)
        )


def _weights_equal(a: list[np.ndarray] | None, b: list[np.ndarray] | None, atol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(_tensors_equal(x, y, atol) for x, y in zip(a, b, strict=True))


# ---- the edge-cloud cascade (opt-in per device; docs/device-serving.md "Cascade") ------------------
PREDICT_DTYPES = ("float32", "float16")  # wire dtype of a PredictRequest's inputs (little-endian)
PREDICT_STATUSES = ("ok", "refused", "unavailable")
MAX_PREDICT_ROWS = 64  # inputs per request
MAX_PREDICT_VALUES = 131_072  # values per request (512 KiB as float32: the base64 text stays < MAX_CONTROL_BYTES)
_PREDICT_ITEMSIZE = {"float32": 4, "float16": 2}


@dataclass(eq=False)
class PredictRequest(Message):
    """Device -> server, only from a device whose owner turned the cascade on: inputs an application
    asked the device to predict and the device's own model was unsure of, for the server's large
    model. Never training samples. `data` is base64 of the values (`dtype`, little-endian, row-major,
    `shape` = [N, H, W, C] scaled as in training); the answer comes on the device's down/predict."""

    TYPE: ClassVar[str] = "predict_request"
    device_id: str
    request_id: str
    shape: list[int] = field(default_factory=list)
    dtype: str = "float16"
    data: str = ""
    ts: float = field(default_factory=time.time)

    def validate(self) -> None:
        import base64
        import binascii

        validate_device_id(self.device_id)
        check_name("request_id", self.request_id)
        check_choice("dtype", self.dtype, PREDICT_DTYPES)
        shape = check_int_list("shape", self.shape, 4, 1, 65_536, optional=False)
        if len(shape) < 2:  # type: ignore[arg-type]
            raise ContractError("bad_shape", "shape must be [N, H, W, C] (or [N, H, W], [N, D])")
        self.shape = shape  # type: ignore[assignment]
        if shape[0] > MAX_PREDICT_ROWS:  # type: ignore[index]
            raise ContractError("oversize", f"shape: more than {MAX_PREDICT_ROWS} inputs in one request")
        n = math.prod(shape)  # type: ignore[arg-type]
        if n > MAX_PREDICT_VALUES:
            raise ContractError("oversize", f"shape: {n} values > {MAX_PREDICT_VALUES}")
        nbytes = n * _PREDICT_ITEMSIZE[self.dtype]
        if not isinstance(self.data, str):
            raise _bad("data", f"expected base64 str, got {type(self.data).__name__}")
        if len(self.data) != 4 * ((nbytes + 2) // 3):
            raise ContractError("bad_shape", f"data: {len(self.data)} base64 characters for {nbytes} bytes of {shape} x {self.dtype}")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("data", "not base64") from None
        x = np.frombuffer(raw, dtype="<f4" if self.dtype == "float32" else "<f2").reshape(shape).astype(np.float32)
        if not np.isfinite(x).all():
            raise ContractError("nan_or_inf", "data holds NaN or Inf")
        self._x = x
        self.ts = check_float("ts", self.ts, 0.0)  # type: ignore[assignment]

    @classmethod
    def from_array(cls, device_id: str, request_id: str, x: np.ndarray, dtype: str = "float16") -> PredictRequest:
        import base64

        check_choice("dtype", dtype, PREDICT_DTYPES)
        a = np.asarray(x, np.float32)
        with np.errstate(over="ignore"):
            wire = a.astype("<f4" if dtype == "float32" else "<f2")
        return cls(device_id=device_id, request_id=request_id, shape=list(a.shape), dtype=dtype,
                   data=base64.b64encode(wire.tobytes()).decode("ascii"))  # fmt: skip

    def array(self) -> np.ndarray:
        """The inputs as float32 [N, ...] (decoded and checked on construction)."""
        return self._x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PredictRequest) and self.scalar_fields() == other.scalar_fields()


@dataclass(eq=False)
class PredictAnswer(Message):
    """Server -> device: the large model's answer to one PredictRequest (`status` ok), or why there is
    none (`refused`: the request does not fit the model; `unavailable`: no large model yet). A request
    over the device's predict budget is dropped unanswered: the device falls back to its own answer."""

    TYPE: ClassVar[str] = "predict_answer"
    device_id: str
    request_id: str
    status: str = "ok"
    classes: list[int] | None = None
    probabilities: list[list[float]] | None = None  # [N, K] softmax of the large model's logits
    model_version: int | None = None  # the large-model version that answered
    reason: str | None = None
    ts: float = field(default_factory=time.time)

    def validate(self) -> None:
        validate_device_id(self.device_id)
        check_name("request_id", self.request_id)
        check_choice("status", self.status, PREDICT_STATUSES)
        self.classes = check_int_list("classes", self.classes, MAX_PREDICT_ROWS, 0, MAX_CLASSES - 1)
        self.model_version = check_int("model_version", self.model_version, optional=True)
        self.reason = check_text("reason", self.reason)
        p = self.probabilities
        if p is not None:
            if isinstance(p, np.ndarray):
                p = p.tolist()
            if not isinstance(p, (list, tuple)) or len(p) > MAX_PREDICT_ROWS:
                raise _bad("probabilities", f"expected a list of at most {MAX_PREDICT_ROWS} rows")
            rows = []
            for i, row in enumerate(p):
                if not isinstance(row, (list, tuple)) or not 1 <= len(row) <= MAX_CLASSES:
                    raise _bad(f"probabilities[{i}]", f"expected a list of 1..{MAX_CLASSES} numbers")
                rows.append([check_float(f"probabilities[{i}]", v, 0.0, 1.0) for v in row])
            if len({len(r) for r in rows}) > 1:
                raise ContractError("bad_shape", "probabilities: rows of different lengths")
            self.probabilities = rows  # type: ignore[assignment]
        if self.status == "ok":
            if self.classes is None or self.probabilities is None or len(self.classes) != len(self.probabilities):
                raise _bad("classes", "an ok answer needs classes and probabilities, one row per input")
            if self.probabilities and any(c >= len(self.probabilities[0]) for c in self.classes):
                raise _bad("classes", "class index beyond the probabilities' columns")
        self.ts = check_float("ts", self.ts, 0.0)  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PredictAnswer) and self.scalar_fields() == other.scalar_fields()


CONTROL_MESSAGES: dict[str, type[Message]] = {
    c.TYPE: c for c in (DeviceStatus, Progress, RoundStatus, ServerStatus, ResultVerdict, PredictRequest,
                        PredictAnswer)
}
FRAME_MESSAGES: dict[str, type[Message]] = {c.TYPE: c for c in (Assignment, Result)}
ALL_MESSAGES: dict[str, type[Message]] = {**CONTROL_MESSAGES, **FRAME_MESSAGES}
