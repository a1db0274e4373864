"""TrainingPlan: what a device must do in one round, typed and versioned (no free-form dict).

Why a typed plan: a free-form `hyper` dict let the server and the device disagree silently (a list
joined to a string, a key named `kd_epochs` on one side and read as reverse KD on the other). The
plan is part of the wire contract: every field has a type and a range, both ends validate it, an
unknown key or a plan of another `version` is a `ContractError` ("bad_field" / "bad_version"), so
a device built for another contract refuses work instead of misbehaving.

The server's policy (`server_app.policy.KoalaPolicy`) fills it; the device's
`device_firmware_py.task.execute_assignment` reads it. Index sets (the round's proxy subset) are
NOT in the plan: they travel as an int32 tensor in the assignment frame (`proxy_indices`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, SupportsFloat, SupportsInt, cast

from .errors import ContractError

PLAN_VERSION = 1
TASKS = ("koala", "fedavg_small", "local_only", "fedavg_large")
UPLOADS = ("logits", "weights")
# wire dtypes a device may be asked to send its proxy logits in (int8: one float scale per tensor)
LOGITS_DTYPES = ("float32", "float16", "int8")
MAX_EPOCHS = 1000


def _int(name: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "dtype") and v.dtype.kind in "iu"):
        raise ContractError("bad_field", f"plan.{name}: expected int, got {type(v).__name__}")
    iv = int(cast(SupportsInt, v))  # an int or a numpy integer (checked above)
    if not lo <= iv <= hi:
        raise ContractError("bad_field", f"plan.{name}: {v} not in [{lo}, {hi}]")
    return iv


def _float(name: str, v: object, lo: float, hi: float, *, lo_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise ContractError("bad_field", f"plan.{name}: expected number, got {type(v).__name__}")
    f = float(cast(SupportsFloat, v))  # a number or anything with __float__ (checked above)
    if not math.isfinite(f):
        raise ContractError("nan_or_inf", f"plan.{name} is {f}")
    if f < lo or (lo_open and f == lo) or f > hi:
        raise ContractError("bad_field", f"plan.{name}: {f} not in {'(' if lo_open else '['}{lo}, {hi}]")
    return f


@dataclass(eq=True)
class TrainingPlan:
    """One device's work in one round. Field order is the order of work on the device:
    load weights (if sent) -> `fkd_epochs` forward KD on the teacher logits -> `local_epochs` local
    training -> `post_fkd_epochs` forward KD again -> upload `upload` (proxy logits in `logits_dtype`)."""

    task: str = "koala"  # koala | fedavg_small | local_only | fedavg_large (server-simulated)
    local_epochs: int = 1  # passes over the device's private data
    lr: float = 1e-3  # local training learning rate (Adam)
    fkd_epochs: int = 1  # forward-KD passes over the (round's) proxy set before local training
    fkd_lr: float = 1e-3
    post_fkd_epochs: int = 0  # forward-KD passes after local training
    temperature: float = 1.0  # forward-KD softmax temperature
    batch: int = 32  # batch size where the device can choose it (LiteRT artifacts are built for 32)
    upload: tuple[str, ...] = ("logits",)  # any of "logits", "weights" (none: local_only)
    # the wire dtype the server asks for the uploaded proxy_logits; the server accepts any of
    # LOGITS_DTYPES, so a device that cannot quantize may send float16 and is only larger
    logits_dtype: str = "float16"
    seed: int = 0  # this device's seed for this round (shuffling)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.version = _int("version", self.version, 0, 2**31 - 1)
        if self.version != PLAN_VERSION:
            raise ContractError("bad_version", f"training plan version {self.version}; this side speaks {PLAN_VERSION}")
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise ContractError("bad_field", f"plan.task: {self.task!r} not one of {TASKS}")
        self.local_epochs = _int("local_epochs", self.local_epochs, 0, MAX_EPOCHS)
        self.fkd_epochs = _int("fkd_epochs", self.fkd_epochs, 0, MAX_EPOCHS)
        self.post_fkd_epochs = _int("post_fkd_epochs", self.post_fkd_epochs, 0, MAX_EPOCHS)
        self.lr = _float("lr", self.lr, 0.0, 10.0)
        self.fkd_lr = _float("fkd_lr", self.fkd_lr, 0.0, 10.0)
        self.temperature = _float("temperature", self.temperature, 0.0, 100.0)
        self.batch = _int("batch", self.batch, 1, 65_536)
        self.seed = _int("seed", self.seed, -(2**62), 2**62)
        up = self.upload
        if isinstance(up, str) or not isinstance(up, (list, tuple)):
            raise ContractError("bad_field", f"plan.upload: expected a list of {UPLOADS}, got {up!r}")
        if any(u not in UPLOADS for u in up) or len(set(up)) != len(up):
            raise ContractError("bad_field", f"plan.upload: {list(up)} must be distinct values of {UPLOADS}")
        self.upload = tuple(up)
        if not isinstance(self.logits_dtype, str) or self.logits_dtype not in LOGITS_DTYPES:
            raise ContractError("bad_field", f"plan.logits_dtype: {self.logits_dtype!r} not one of {LOGITS_DTYPES}")

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready dict (the `plan` object of an assignment frame header)."""
        d = asdict(self)
        d["upload"] = list(self.upload)
        return d

    @classmethod
    def from_wire(cls, d: object) -> TrainingPlan:
        """Validated plan from a decoded header; unknown keys and other versions are refused."""
        if isinstance(d, TrainingPlan):
            d.validate()
            return d
        if not isinstance(d, dict):
            raise ContractError("bad_field", f"plan: expected an object, got {type(d).__name__}")
        if d.get("version") != PLAN_VERSION:
            raise ContractError("bad_version", f"training plan version {d.get('version')!r}; this side speaks {PLAN_VERSION}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ContractError("bad_field", f"plan: unknown fields {extra[:5]} (a newer contract?)")
        return cls(**d)
