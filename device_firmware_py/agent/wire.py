"""Device-side glue between the contract's messages and the engine's wire dataclasses.

`contract.engine_map` does the 1:1 field mapping; this adds the one thing the contract cannot
carry as is: list-valued hyperparameters (`upload: ["logits", "weights"]`) — the contract's hyper
dict holds JSON scalars only, so lists travel comma-joined. The server's MqttFleet uses the same
two functions, so both ends agree.
"""

from __future__ import annotations

import math
from typing import Any

from device_firmware_py.contract import engine_map
from device_firmware_py.contract import messages as cm


def hyper_to_wire(hyper: dict[str, Any]) -> dict[str, Any]:
    return {k: (",".join(map(str, v)) if isinstance(v, (list, tuple, set)) else v) for k, v in hyper.items()}


def hyper_from_wire(hyper: dict[str, Any]) -> dict[str, Any]:
    out = dict(hyper)
    if isinstance(out.get("upload"), str):
        out["upload"] = [u for u in out["upload"].split(",") if u]
    return out


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-scalar, finite metrics only (a NaN loss of an empty epoch must not void a result)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            out[k] = v
        elif isinstance(v, (int, float)) or hasattr(v, "item"):
            f = float(v)
            out[k] = f if math.isfinite(f) else None
    return out


def assignment_from_wire(msg: cm.Assignment) -> Any:
    a = engine_map.assignment_to_engine(msg)
    a.hyper = hyper_from_wire(a.hyper)
    return a


def assignment_to_wire(a: Any, *, proxy_digest: str | None, deadline: float | None) -> cm.Assignment:
    hyper = a.hyper
    a.hyper = hyper_to_wire(hyper or {})
    try:
        return engine_map.assignment_from_engine(a, proxy_digest=proxy_digest, deadline=deadline)
    finally:
        a.hyper = hyper


def result_to_wire(r: Any, model_version: int, proxy_digest: str | None) -> cm.Result:
    r.metrics = clean_metrics(r.metrics)
    return engine_map.result_from_engine(r, model_version=model_version, proxy_digest=proxy_digest)
