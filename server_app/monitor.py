"""Read-only MQTT monitor: subscribe to the contract's topics and turn each message into one record.

Why a library module (the command is `server_app/commands/monitor.py`): tests and other tools reuse
`describe()` / `format_line()` without a terminal. Topic filters come from
`device_firmware_py.contract.topics`, never from copied strings, so the monitor follows the contract.

Binary frames (assignments with teacher logits, results with proxy logits/weights) are summarised
from their header only — device, round, bytes, tensor names/dtypes/shapes, digest check — the
tensor bodies are never decoded or printed. A message that breaks the contract is still shown,
with the contract's reason code, because that is exactly what an operator wants to see.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract.errors import ContractError

# Named groups for --topics; anything else containing '/' is taken as a raw MQTT filter.
TOPIC_GROUPS: dict[str, Callable[[], list[tuple[str, int]]]] = {
    "status": lambda: [(topics.filter_device_status(), 1)],
    "progress": lambda: [(topics.filter_progress(), 0)],
    "results": lambda: [(topics.filter_results(), 1)],
    "rounds": lambda: [(topics.filter_rounds(), 1)],
    "server": lambda: [(topics.server_status(), 1)],
    "all": lambda: [(topics.filter_everything(), 1)],
}
DEFAULT_GROUPS = ("status", "progress", "results", "rounds", "server")


def subscriptions(names: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """Filters for group names / raw filters; default: device status, progress, results, rounds, server."""
    out: dict[str, int] = {}
    for name in names or DEFAULT_GROUPS:
        if name in TOPIC_GROUPS:
            pairs = TOPIC_GROUPS[name]()
        elif "/" in name or name == "#":
            pairs = [(name, 1)]
        else:
            raise ValueError(f"unknown topic group {name!r}; use one of {sorted(TOPIC_GROUPS)} or an MQTT filter")
        for f, q in pairs:
            out[f] = max(q, out.get(f, 0))
    return list(out.items())


def _frame_summary(payload: bytes) -> dict[str, Any]:
    kind, header, _body = codec.read_frame_header(payload)  # checks sizes + sha256, allocates nothing big
    tensors = [
        {"name": t.get("name"), "dtype": t.get("dtype"), "shape": t.get("shape")}
        for t in header.get("tensors", [])
        if isinstance(t, dict)
    ]
    meta = m if isinstance(m := header.get("meta"), dict) else {}
    rec: dict[str, Any] = {
        "frame": kind,
        "device_id": header.get("device_id"),
        "round_id": header.get("round_id"),
        "model_version": header.get("model_version"),
        "tensors": tensors,
        "body_sha256": header.get("body_sha256"),
    }
    for k in ("arch", "num_samples", "task"):
        if k in meta:
            rec[k] = meta[k]
    if isinstance(meta.get("metrics"), dict):
        rec["metrics"] = {k: v for k, v in meta["metrics"].items() if isinstance(v, (int, float, str))}
    return rec


def describe(topic: str, payload: bytes, *, retained: bool = False, ts: float | None = None) -> dict[str, Any]:
    """One delivered message -> a JSON-ready record. Never raises on bad input."""
    rec: dict[str, Any] = {
        "ts": dt.datetime.fromtimestamp(ts if ts is not None else time.time(), dt.timezone.utc).isoformat(timespec="milliseconds"),
        "topic": topic,
        "bytes": len(payload),
        "retained": bool(retained),
    }
    try:
        parsed = topics.parse_topic(topic)
    except ContractError as exc:
        rec.update(kind="foreign", error=exc.reason)
        return rec
    rec["kind"] = parsed.kind
    if parsed.device_id is not None:
        rec["device_id"] = parsed.device_id
    if parsed.round_id is not None:
        rec["round_id"] = parsed.round_id
    if not payload:
        rec["cleared"] = True  # an empty retained message deletes the retained state
        return rec
    try:
        if payload[:4] == codec.MAGIC:
            summary = {k: v for k, v in _frame_summary(payload).items() if v is not None}
            claimed = summary.pop("device_id", None)
            rec.update(summary)
            if parsed.device_id is not None and claimed != parsed.device_id:
                # the topic is what the broker's ACL authenticated; the header is only a claim
                rec.update(invalid="spoofed_device", detail=f"payload claims device {claimed!r}")
        else:
            _, msg = codec.decode_for_topic(topic, payload)
            rec.update({k: v for k, v in msg.scalar_fields().items() if v is not None and k != "ts"})
            rec["sent_ts"] = msg.scalar_fields().get("ts")
    except ContractError as exc:
        rec["invalid"] = exc.reason
        rec["detail"] = exc.detail[:200]
    return rec


def _hms(iso: str) -> str:
    return iso[11:23]


def _shape(t: dict[str, Any]) -> str:
    shape = t.get("shape")
    dims = ",".join(str(d) for d in shape) if isinstance(shape, list) else "?"
    return f"{t.get('name')}:{t.get('dtype')}[{dims}]"


def format_line(rec: dict[str, Any]) -> str:
    """A record as one human-readable line (no tensor data, ever)."""
    kind = rec.get("kind", "?")
    head = f"{_hms(rec['ts'])} {'R' if rec.get('retained') else ' '} "
    if rec.get("invalid"):
        who = rec.get("device_id") or rec.get("round_id") or ""
        return head + f"{kind:<13} {who} INVALID {rec['invalid']}: {rec.get('detail', '')} ({rec['bytes']} B)"
    if rec.get("cleared"):
        return head + f"{kind:<13} {rec['topic']} (retained state cleared)"
    if kind == "device_status":
        bits = [rec.get("state", "?")]
        for k, label in (("arch", "arch"), ("num_samples", "samples"), ("runtime_version", "runtime")):
            if rec.get(k) is not None:
                bits.append(f"{label}={rec[k]}")
        return head + f"device        {rec.get('device_id')} " + " ".join(bits)
    if kind == "progress":
        total = f"/{rec['total']}" if rec.get("total") is not None else ""
        loss = f" loss={rec['loss']:.4f}" if isinstance(rec.get("loss"), (int, float)) else ""
        return head + f"progress      {rec.get('device_id')} round {rec.get('round_id')} {rec.get('phase')} {rec.get('step')}{total}{loss}"
    if kind in ("round_status", "round_current"):
        n = len(rec.get("participants") or [])
        m = rec.get("metrics") or {}
        acc = m.get("large_test_acc")
        extra = f" large_acc={acc:.4f}" if isinstance(acc, (int, float)) else ""
        err = f" error={rec['error']}" if rec.get("error") else ""
        where = "round" if kind == "round_status" else "round(current)"
        return head + (
            f"{where:<13} {rec.get('round_id')} {rec.get('state')} received={rec.get('received', 0)}/{n} "
            f"accepted={rec.get('accepted', 0)} rejected={rec.get('rejected', 0)}{extra}{err}"
        )
    if kind == "server_status":
        cur = f" current_round={rec['current_round']}" if rec.get("current_round") is not None else ""
        return head + f"server        {rec.get('state')} version={rec.get('version', '?')}{cur}"
    if kind in ("result", "assign"):
        shapes = " ".join(_shape(t) for t in rec.get("tensors", [])[:4])
        more = len(rec.get("tensors", [])) - 4
        shapes += f" +{more} tensors" if more > 0 else ""
        arch = f" arch={rec['arch']}" if rec.get("arch") else ""
        ns = f" samples={rec['num_samples']}" if rec.get("num_samples") is not None else ""
        return head + f"{kind:<13} {rec.get('device_id')} round {rec.get('round_id')} {rec['bytes']} B{arch}{ns} {shapes}".rstrip()
    return head + f"{kind:<13} {rec['topic']} ({rec['bytes']} B)"


class Monitor:
    """Connects with a clean session (a monitor must leave nothing queued behind) and calls
    `on_record(record)` for every message; stops after `count` messages or `stop()`."""

    def __init__(
        self,
        broker_url: str,
        filters: list[tuple[str, int]],
        on_record: Callable[[dict[str, Any]], None],
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        client_id: str | None = None,
        count: int | None = None,
    ) -> None:
        import secrets
        import ssl

        import paho.mqtt.client as mqtt

        from device_firmware_py.mqtt import parse_broker_url

        a = parse_broker_url(broker_url)
        self.filters = filters
        self.on_record = on_record
        self.count = count
        self.seen = 0
        self.done = threading.Event()
        self.connected = threading.Event()
        self.error: str | None = None
        self.address = f"{a.host}:{a.port}"
        self.url = f"{'mqtts' if a.tls or ca_file else 'mqtt'}://{self.address}"
        self.client_id = client_id or f"koala-monitor-{secrets.token_hex(4)}"
        self.refused: list[str] = []  # filters the broker did not grant (ACL)
        self.subscribed = threading.Event()
        self._on_joined: Callable[[], None] | None = None
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        user, pw = username or a.username, password if password is not None else a.password
        if user:
            c.username_pw_set(user, pw)
        if a.tls or ca_file:
            c.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.reconnect_delay_set(0.2, 5)  # type: ignore[arg-type]  # paho's stub says int; a float delay works
        self._client = c
        self._host, self._port = a.host, a.port
        self._lock = threading.Lock()

    def _on_connect(self, client: Any, _ud: Any, _flags: Any, reason_code: Any, _props: Any = None) -> None:
        if getattr(reason_code, "is_failure", False):
            self.error = f"connection refused: {reason_code}"
            self.done.set()
            return
        client.subscribe(self.filters)
        self.connected.set()

    def _on_connect_fail(self, _client: Any, _ud: Any) -> None:
        self.error = self.error or "no MQTT connection (nothing listening, or TLS / network failure)"

    def _on_subscribe(self, _client: Any, _ud: Any, _mid: Any, reason_codes: Any, _props: Any = None) -> None:
        # the SUBACK comes before any message of these subscriptions (retained ones included)
        with self._lock:
            for (f, _q), rc in zip(self.filters, reason_codes or [], strict=False):
                if getattr(rc, "is_failure", False) and f not in self.refused:
                    self.refused.append(f)
            if self._on_joined is not None and not self.subscribed.is_set():
                self._on_joined()
            self.subscribed.set()

    def _on_message(self, _c: Any, _ud: Any, msg: Any) -> None:
        with self._lock:
            if self.done.is_set():
                return
            rec = describe(msg.topic, bytes(msg.payload), retained=bool(msg.retain))
            try:
                self.on_record(rec)
            finally:
                self.seen += 1
                if self.count is not None and self.seen >= self.count:
                    self.done.set()

    def run(
        self,
        timeout_s: float | None = None,
        *,
        connect_timeout_s: float | None = None,
        on_joined: Callable[[], None] | None = None,
        quiet_s: float | None = None,
        on_quiet: Callable[[], None] | None = None,
    ) -> int:
        """Block until `count` messages, `timeout_s`, `stop()` or Ctrl-C; returns messages seen.

        `connect_timeout_s`: ConnectionError when not connected by then (else: wait, retrying).
        `on_joined()` once subscribed; `on_quiet()` once when `quiet_s` pass with no message at all
        (a KOALA broker delivers the server's retained status at once: silence means a wrong broker)."""
        t0 = time.monotonic()
        t_end = None if timeout_s is None else t0 + timeout_s
        self._on_joined = on_joined
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()
        try:
            limit = min(x for x in (connect_timeout_s, timeout_s, float("inf")) if x is not None)
            while not self.connected.wait(0.05):
                if self.done.is_set() or time.monotonic() - t0 > limit:
                    break
            if self.connected.is_set():
                if quiet_s is not None and on_quiet is not None:
                    wait = quiet_s if t_end is None else min(quiet_s, max(0.0, t_end - time.monotonic()))
                    if not self.done.wait(wait) and self.seen == 0:
                        on_quiet()
                self.done.wait(None if t_end is None else max(0.0, t_end - time.monotonic()))
        finally:
            self._client.disconnect()
            self._client.loop_stop()
        if not self.connected.is_set():
            why = f": {self.error}" if self.error else ""
            raise ConnectionError(f"could not connect to the broker at {self.url}{why}")
        if self.error:
            raise ConnectionError(self.error)
        return self.seen

    def stop(self) -> None:
        self.done.set()


def to_json(rec: dict[str, Any]) -> str:
    return json.dumps(rec, separators=(",", ":"), default=str)
