"""A small paho-mqtt 2.x client: auto-reconnect, persistent session, Last Will, per-filter handlers.

Why this exists next to the agent: the agent (and the server services, which reuse it) need only
publish/subscribe-with-handler/Last Will/reconnect. Subscriptions are re-sent on every
(re)connect, so a broker that lost its session state still delivers. MQTT 3.1.1 by default (the
embedded amqtt broker speaks nothing else; Mosquitto speaks both).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("koala.mqtt")
Handler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _match_filter(f: str) -> str:
    """`$share/group/a/+/b` -> `a/+/b`: delivered topics never carry the share prefix."""
    return f.split("/", 2)[2] if f.startswith("$share/") else f


class MqttLink:
    """Create, `subscribe(...)` any number of filters, `start()`, `publish(...)`, `stop()`."""

    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        keepalive: int = 15,
        clean_session: bool = False,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        protocol: int = mqtt.MQTTv311,
    ):
        self.host, self.port = host, port
        self._subs: list[tuple[str, int, Handler]] = []
        self._on_connect_cb = on_connect
        self.connected = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=protocol)
        if username:
            c.username_pw_set(username, password)
        if tls or ca_file:
            c.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.reconnect_delay_set(min_delay=0.2, max_delay=5)
        c.max_inflight_messages_set(64)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.keepalive = keepalive
        self.client = c

    def subscribe(self, topic_filter: str, qos: int, handler: Handler) -> None:
        self._subs.append((topic_filter, qos, handler))
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos)

    def start(self, wait_s: float | None = None) -> bool:
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        return self.connected.wait(wait_s) if wait_s else self.connected.is_set()

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self.connected.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait_s: float | None = None) -> Any:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if wait_s and qos > 0:
            # not connected / queue full: paho re-sends QoS 1 after the reconnect anyway
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(wait_s)
        return info

    # paho callbacks (network thread)
    def _on_connect(self, client: Any, _ud: Any, _flags: Any, reason_code: Any, _props: Any = None) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("mqtt connect refused host=%s port=%d reason=%s", self.host, self.port, reason_code)
            return
        for f, q, _ in self._subs:
            client.subscribe(f, q)
        self.connected.set()
        log.info("mqtt connected host=%s port=%d subs=%d", self.host, self.port, len(self._subs))
        if self._on_connect_cb is not None:
            self._on_connect_cb()

    def _on_disconnect(self, _c: Any, _ud: Any, _flags: Any, reason_code: Any, _props: Any = None) -> None:
        self.connected.clear()
        log.info("mqtt disconnected reason=%s", reason_code)

    def _on_message(self, _c: Any, _ud: Any, msg: Any) -> None:
        for f, _, handler in self._subs:
            if mqtt.topic_matches_sub(_match_filter(f), msg.topic):
                try:
                    handler(msg.topic, bytes(msg.payload))
                except Exception:  # a handler bug must not kill the network thread
                    log.exception("handler failed topic=%s", msg.topic)
                return
