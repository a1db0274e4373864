"""Cascade: the device's model first, the server's large model for the inputs it is unsure of.

OPT-IN (DeviceConfig `cascade = true`; off by default) because it SENDS INPUTS TO THE SERVER: the
inputs an application asks the device to predict whose top softmax probability under the served
(int8) model is below `cascade_threshold` go, as a PredictRequest on the device's own
`devices/<id>/up/predict`, to the server, which answers with its large model on `.../down/predict`.
Nothing else is ever sent: not the training samples in the store, not the inputs the device is
confident about, nothing at all with the cascade off (no object of this class exists then).

Falls back to the device's own answer, per request, when: the MQTT link is down, the local rate
limit is spent (`per_s` / `burst`, below the server's per-device predict budget so an honest device
is not dropped there), or no ok answer came within `timeout_s` (server busy, over its budget,
no large model yet). The answer marks each row's source: "device" or "server".

Threads: `forward` runs on the local endpoint's request threads; `on_answer` on the MQTT network
thread (a dict lookup and an Event; never the agent thread, which may be training for minutes).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.errors import ContractError

log = logging.getLogger("koala.device.cascade")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class CascadeOutcome:
    classes: np.ndarray  # [N] int64: the server's class where it answered, else the device's
    source: list[str]  # per row: "device" | "server"
    confidence: np.ndarray  # [N] the device model's max softmax probability
    server_model_version: int | None
    fallback: str | None  # why low-confidence rows kept the device's answer (None: none did)


class Cascade:
    def __init__(self, device_id: str, publish: Callable[[str, bytes], bool], connected: Callable[[], bool], *,
                 threshold: float = 0.7, timeout_s: float = 2.0, per_s: float = 4.0, burst: int = 8,
                 dtype: str = "float16") -> None:  # fmt: skip
        self.device_id = device_id
        self.topic = topics.device_predict_request(device_id)
        self.answer_topic = topics.device_predict_answer(device_id)
        self._publish, self._connected = publish, connected
        self.threshold, self.timeout_s = float(threshold), float(timeout_s)
        self.per_s, self.burst, self.dtype = float(per_s), int(burst), dtype
        self._tokens, self._t = float(burst), time.monotonic()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[threading.Event, list[cm.PredictAnswer]]] = {}
        self.stats = {"rows": 0, "forwarded_rows": 0, "server_rows": 0, "requests": 0, "answers": 0, "timeouts": 0,
                      "rate_limited": 0, "offline": 0, "refused": 0, "bytes_up": 0, "bytes_down": 0}  # fmt: skip

    # ------------------------------------------------------------ MQTT network thread
    def on_answer(self, topic: str, payload: bytes) -> None:
        try:
            _, ans = codec.decode_for_topic(topic, payload)
        except ContractError as exc:
            log.warning("predict answer refused reason=%s detail=%s", exc.reason, exc.detail)
            return
        with self._lock:
            waiter = self._pending.get(getattr(ans, "request_id", ""))
            self.stats["bytes_down"] += len(payload)
        if waiter is not None:  # else: an answer that came after its request gave up
            waiter[1].append(ans)  # type: ignore[arg-type]
            waiter[0].set()

    # ------------------------------------------------------------ request threads
    def _take(self, n: int) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._t) * self.per_s)
            self._t = now
            if self._tokens >= n:
                self._tokens -= n
                return True
            return False

    def ask(self, x: np.ndarray) -> tuple[np.ndarray | None, int | None, str | None]:
        """The server's classes for the rows of x (or None) + its model version + why not."""
        rows = np.asarray(x, np.float32)
        per = max(1, min(cm.MAX_PREDICT_ROWS, cm.MAX_PREDICT_VALUES // max(1, int(np.prod(rows.shape[1:])))))
        chunks = [rows[i : i + per] for i in range(0, len(rows), per)]
        if not self._connected():
            self.stats["offline"] += 1
            return None, None, "offline"
        if not self._take(len(chunks)):
            self.stats["rate_limited"] += 1
            return None, None, "rate_limited"
        waits = []
        for chunk in chunks:
            rid = secrets.token_hex(8)
            req = cm.PredictRequest.from_array(self.device_id, rid, chunk, self.dtype)
            data = codec.encode_control(req)
            ev, box = threading.Event(), list[cm.PredictAnswer]()
            with self._lock:
                self._pending[rid] = (ev, box)
                self.stats["bytes_up"] += len(data)
            waits.append((rid, ev, box))
            self.stats["requests"] += 1
            self._publish(self.topic, data)
        t_end = time.monotonic() + self.timeout_s
        out, version, why = [], None, None
        try:
            for _rid, ev, box in waits:
                if not ev.wait(max(0.0, t_end - time.monotonic())):
                    self.stats["timeouts"] += 1
                    return None, None, "timeout"
                ans = box[0]
                self.stats["answers"] += 1
                if ans.status != "ok" or ans.classes is None:
                    self.stats["refused"] += 1
                    return None, None, f"server_{ans.status}"
                out.extend(ans.classes)
                version = ans.model_version
        finally:
            with self._lock:
                for rid, _ev, _box in waits:
                    self._pending.pop(rid, None)
        if len(out) != len(rows):
            return None, None, "bad_answer"
        return np.asarray(out, np.int64), version, why

    def apply(self, x: np.ndarray, logits: np.ndarray) -> CascadeOutcome:
        """The device's answer, with the server's where the device was unsure and the server answered.
        `x` [N, H, W, C] are the inputs the device's model gave `logits` [N, K] for."""
        classes = logits.argmax(1).astype(np.int64)
        conf = softmax(logits).max(axis=1)
        source = ["device"] * len(classes)
        low = np.flatnonzero(conf < self.threshold)
        self.stats["rows"] += len(classes)
        version, why = None, None
        if len(low):
            self.stats["forwarded_rows"] += len(low)
            server, version, why = self.ask(np.asarray(x, np.float32)[low])
            if server is not None:
                classes[low] = server
                for i in low:
                    source[int(i)] = "server"
                self.stats["server_rows"] += len(low)
        return CascadeOutcome(classes, source, conf, version, why)

    def info(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "timeout_s": self.timeout_s, **self.stats}
