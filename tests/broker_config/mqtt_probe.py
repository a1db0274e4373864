"""A tiny synchronous paho wrapper for broker tests: connect, subscribe, publish, collect.

Negative delivery ("B's subscriber sees nothing") is shown without sleeps: the forbidden publish
is followed, on the same path, by an allowed sentinel; Mosquitto routes one connection's messages
in order, so once the sentinel arrives the forbidden message would have arrived before it.
"""

from __future__ import annotations

import queue
import ssl
import threading
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

WAIT_S = 10.0


class Refused(Exception):
    """The broker did not accept the connection (bad credentials, TLS mismatch, ...)."""


@dataclass
class Probe:
    port: int
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    protocol: int = mqtt.MQTTv311
    will: tuple[str, bytes] | None = None
    # None: a device account's bound id (`koala-dev-<username>`, which the broker requires of it);
    # a random one for service accounts and anonymous probes
    client_id: str | None = None
    clean_session: bool = True  # MQTT 3.1.1 only: False resumes (or creates) a persistent session
    client: mqtt.Client = field(init=False)
    messages: queue.Queue = field(default_factory=queue.Queue, init=False)
    _connected: threading.Event = field(default_factory=threading.Event, init=False)
    _done: threading.Event = field(default_factory=threading.Event, init=False)
    _rc: object = field(default=None, init=False)
    _subacks: queue.Queue = field(default_factory=queue.Queue, init=False)
    disconnected: threading.Event = field(default_factory=threading.Event, init=False)

    def connect(self) -> Probe:
        cid = self.client_id
        if cid is None:
            device = self.username is not None and not self.username.startswith("koala-")
            cid = f"koala-dev-{self.username}" if device else f"probe-{uuid.uuid4().hex[:8]}"
        v311 = self.protocol != mqtt.MQTTv5
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=self.protocol,
                        **({"clean_session": self.clean_session} if v311 else {}))
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.ca_file:
            c.tls_set(ca_certs=self.ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if self.will:
            c.will_set(self.will[0], self.will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self._subacks.put(list(rcs))
        self.client = c
        try:
            c.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise Refused(f"connect failed: {exc}") from exc
        c.loop_start()
        self._done.wait(WAIT_S)
        if not self._connected.is_set():
            c.loop_stop()
            raise Refused(f"not accepted: {self._rc}")
        return self

    def _on_connect(self, _c, _u, _flags, rc, _props) -> None:
        self._rc = rc
        if not rc.is_failure:
            self._connected.set()
        self._done.set()

    def _on_disconnect(self, _c, _u, _flags, rc, _props) -> None:
        self._rc = self._rc or rc
        self.disconnected.set()
        self._done.set()

    def subscribe(self, topic: str, qos: int = 1) -> list:
        self.client.subscribe(topic, qos)
        return self._subacks.get(timeout=WAIT_S)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT_S)

    def next_message(self, timeout: float = WAIT_S) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Collect messages until (topic, payload) arrives; return everything before it."""
        seen = []
        while True:
            msg = self.next_message()
            if msg == (topic, payload):
                return seen
            seen.append(msg)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
