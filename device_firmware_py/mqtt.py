"""Reusable paho-mqtt 2.x client for devices and server: reconnect, persistent session, QoS 1, LWT.

Why one wrapper for both sides: the reliability rules are the same everywhere and easy to get wrong
with raw paho — a stable client id + clean_session=False so the broker queues QoS 1 messages while
we are away; subscriptions re-sent on every (re)connect in case the broker lost the session; a Last
Will so others learn we died; handler exceptions logged, never allowed to kill paho's network thread.
Opt-in manual acknowledgement (`manual_ack=True` + `subscribe(..., deferred_ack=True)`): the PUBACK
goes out only when the handler says its work is durable, so the broker's inflight window — not our
memory — holds a backlog, and a message is never acknowledged before it is safe.
MQTT 3.1.1 by default (amqtt speaks nothing else); MQTT 5 is optional and carries no meaning.
Device-safe: stdlib + paho only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("koala.mqtt")
Handler = Callable[[str, bytes], None]
Ack = Callable[[], None]
DeferredHandler = Callable[[str, bytes, Ack], None]
SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5 only: how long the broker keeps our queued messages


@dataclass(frozen=True)
class Will:
    """Last Will: published by the broker when we vanish without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:1883]` or `mqtts://host[:8883]` (TLS)."""
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
    if not u.hostname:
        raise ValueError(f"broker url {url!r} has no host")
    tls = u.scheme in ("mqtts", "ssl")
    return BrokerAddress(
        host=u.hostname,
        port=u.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(u.username) if u.username else None,
        password=unquote(u.password) if u.password else None,
    )


def connect_error_reason(exc: BaseException) -> str:
    """Why a TCP/TLS connect failed, in words an operator can act on."""
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved (DNS: {exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port: broker down or wrong port?)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out (host unreachable or a firewall drops the packets?)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}): check the CA file and mqtts:// port"
    return f"{type(exc).__name__}: {exc.strerror or exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"


class _PahoClient(mqtt.Client):
    """paho's client, telling us why a (re)connect attempt failed: paho's own loop swallows the
    OSError and then logs only `Client is not connected. Socket: None` on every retry.
    And failover: paho retries one host; `pick_host` (MqttClient's) chooses the address of every
    attempt, so a client given several broker nodes moves to the next one when its node is gone."""

    on_connect_error: Callable[[BaseException], None] | None = None
    pick_host: Callable[[], tuple[str, int]] | None = None

    def reconnect(self) -> Any:
        if self.pick_host is not None:
            self._host, self._port = self.pick_host()
        try:
            return super().reconnect()
        except OSError as exc:
            if self.on_connect_error is not None:
                self.on_connect_error(exc)
            raise


class _NoSocketNoise(logging.Filter):
    """Drop paho's `Client is not connected. Socket: None` (logged at ERROR on every retry while the
    broker is unreachable); MqttClient logs the actual reason instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


def _no_delay(_c: Any, _ud: Any, sock: Any) -> None:
    """TCP_NODELAY on our side of the connection (Mosquitto sets it on its side; paho does not):
    with Nagle's algorithm a small publish waits for the ACK of the previous one, and a request /
    answer over the broker took 88 ms instead of 3.8 ms (bench/cascade.py, loopback)."""
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (a unix socket, a websocket wrapper)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _strip_share(f: str) -> str:
    """`$share/group/a/+/b` -> `a/+/b`: delivered topics never carry the share prefix."""
    return f.split("/", 2)[2] if f.startswith("$share/") and f.count("/") >= 2 else f


class MqttClient:
    """Create, `subscribe(filter, qos, handler)`, `start()`, `publish(...)`, `stop()`.

    Thread-safe: publish/subscribe may be called from any thread. Handlers run on paho's network
    thread: keep them short (hand heavy work to a queue).

    With `manual_ack=True`, a handler subscribed with `deferred_ack=True` gets a third argument
    `ack()` and the PUBACK is sent when it (from any thread) calls it; every other message (plain
    handlers, no handler matched, a handler that raised) is acknowledged as soon as its handlers
    return, so nothing sits unacknowledged forever. An `ack()` from before a reconnect is dropped:
    packet ids are per connection, and a stale one could acknowledge a different message.
    """

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
        cert_file: str | None = None,
        key_file: str | None = None,
        keepalive: int = 30,
        clean_session: bool = False,
        will: Will | None = None,
        protocol: str | int = "3.1.1",
        on_connect: Callable[[], None] | None = None,
        reconnect_min_s: float = 0.2,
        reconnect_max_s: float = 10.0,
        manual_ack: bool = False,
        hosts: Sequence[tuple[str, int]] | None = None,
    ) -> None:
        self.client_id = client_id
        # several nodes of one clustered broker (docs/broker-cluster.md): the first is dialled
        # first; after a lost connection or a failed attempt the next one, round robin
        self.hosts = [(h, int(p)) for h, p in hosts] if hosts else [(host, port)]
        self._host_i, self._dialled = 0, False
        self.host, self.port = self.hosts[0]
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.v5 = protocol in ("5", 5, mqtt.MQTTv5)
        self.manual_ack = manual_ack
        self._subs: dict[str, tuple[int, Any, bool]] = {}  # filter -> (qos, handler, deferred_ack)
        self._unsub_waits: dict[int, tuple[str, threading.Event]] = {}  # UNSUBSCRIBE mid -> (filter, done)
        self._conn_gen = 0  # bumped on every (dis)connect: acks of older deliveries are stale
        self._lock = threading.Lock()
        self._on_connect_cb = on_connect
        self.connected = threading.Event()
        self.connect_count = 0  # how many successful (re)connects: tests and metrics
        # monotonic times of the last delivery and the last connect: a watchdog tells a link that is
        # connected but delivers nothing (server_app.intake_watchdog) from a quiet one
        self.last_delivery_at = 0.0
        self.connected_at = 0.0
        self.last_error: str | None = None
        self.connect_failures = 0  # failed connect attempts since the last successful connect
        self._reconnect_min_s, self._reconnect_max_s = reconnect_min_s, reconnect_max_s
        self._quiet_failures = False  # while start(wait_s) waits, the caller reports a failure
        proto = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        if self.v5:  # v5 has clean_start/session expiry instead of clean_session
            c = _PahoClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, manual_ack=manual_ack)
        else:
            c = _PahoClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                            protocol=proto, manual_ack=manual_ack)  # fmt: skip
        c.on_connect_error = self._on_connect_error
        if len(self.hosts) > 1:
            c.pick_host = self._pick_host
        if username:
            c.username_pw_set(username, password)
        if tls or ca_file or cert_file:
            c.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)  # type: ignore[arg-type]
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)  # unbounded: QoS 1 publishes made while offline go out after reconnect
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_unsubscribe = self._on_unsubscribe
        c.on_socket_open = _no_delay
        paho_log = logging.getLogger("koala.mqtt.paho")
        if not any(isinstance(f, _NoSocketNoise) for f in paho_log.filters):
            paho_log.addFilter(_NoSocketNoise())
        c.enable_logger(paho_log)
        self.client = c

    @classmethod
    def from_url(cls, url: str, client_id: str, **kwargs: Any) -> MqttClient:
        """Build from `mqtt://` / `mqtts://` URL; explicit username/password kwargs win over the URL's."""
        a = parse_broker_url(url)
        kwargs.setdefault("username", a.username)
        kwargs.setdefault("password", a.password)
        kwargs.setdefault("tls", a.tls)
        return cls(client_id, a.host, a.port, **kwargs)

    @classmethod
    def from_urls(cls, urls: Sequence[str], client_id: str, **kwargs: Any) -> MqttClient:
        """Several nodes of one broker (`mqtts://n1:8883`, `mqtts://n2:8883`, ...): same scheme and
        credentials on all (those of the first URL unless given); failover goes round robin."""
        if not urls:
            raise ValueError("no broker url")
        addrs = [parse_broker_url(u) for u in urls]
        if len({a.tls for a in addrs}) > 1:
            raise ValueError("broker urls mix mqtt:// and mqtts://")
        kwargs.setdefault("username", addrs[0].username)
        kwargs.setdefault("password", addrs[0].password)
        kwargs.setdefault("tls", addrs[0].tls)
        return cls(client_id, addrs[0].host, addrs[0].port, hosts=[(a.host, a.port) for a in addrs], **kwargs)

    def _pick_host(self) -> tuple[str, int]:
        """The address of the next connect attempt: the first one first, then round robin (a new
        attempt means the last connection was lost or the last attempt failed)."""
        if self._dialled:
            self._host_i = (self._host_i + 1) % len(self.hosts)
        self._dialled = True
        self.host, self.port = self.hosts[self._host_i]
        return self.host, self.port

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self, wait_s: float | None = None) -> bool:
        """Connect in the background (retrying until the broker is there); True if connected within wait_s."""
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.clean_session else SESSION_EXPIRY_S
            self.client.connect_async(self.host, self.port, keepalive=self.keepalive, clean_start=self.clean_session, properties=props)
        else:
            self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        if not wait_s:
            self.client.loop_start()
            return self.connected.is_set()
        self._quiet_failures = True  # the caller reports (with last_error) if this wait fails
        try:
            self.client.loop_start()
            return self.wait_connected(wait_s)
        finally:
            self._quiet_failures = False

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self) -> None:
        """Clean disconnect (no Last Will) and stop the network thread."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self.connected.clear()

    def force_reconnect(self) -> bool:
        """Drop the connection as a network fault would (no DISCONNECT, so paho's loop reconnects
        with its backoff and re-subscribes): the cure for a link that is connected but stuck.
        False when there was no socket to drop."""
        sock = self.client.socket()
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]  # paho's SocketLike omits it; sockets have it
        except OSError:
            return False
        log.warning("mqtt connection to %s:%d dropped on purpose (client=%s): reconnecting", self.host, self.port,
                    self.client_id)  # fmt: skip
        return True

    def __enter__(self) -> MqttClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- pub/sub --------------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, qos: int, handler: Handler | DeferredHandler, *,
                  deferred_ack: bool = False) -> None:
        """Register a handler; (re)subscribed on every connect. One handler per filter (last wins).

        deferred_ack=True (needs manual_ack=True): handler(topic, payload, ack); the message is
        acknowledged when ack() is called, not when the handler returns.
        """
        if deferred_ack and not self.manual_ack:
            raise ValueError("deferred_ack needs MqttClient(manual_ack=True)")
        with self._lock:
            self._subs[topic_filter] = (qos, handler, deferred_ack)
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str, wait_s: float | None = None) -> bool:
        """Stop a subscription. While connected the handler stays until the broker's UNSUBACK, so
        messages the broker sent before it still reach their handler (and are acknowledged by it)
        instead of being acknowledged unhandled. With wait_s, block until then; True if done."""
        done = threading.Event()
        if self.connected.is_set():
            rc, mid = self.client.unsubscribe(topic_filter)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                with self._lock:
                    self._unsub_waits[mid] = (topic_filter, done)
                return done.wait(wait_s) if wait_s else False
        with self._lock:
            self._subs.pop(topic_filter, None)
        return True

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, wait_s: float | None = None
    ) -> bool:
        """Queue a message; with wait_s, block until the broker acknowledged it (QoS 1) or time ran out.

        Returns True when acknowledged (or queued, without wait_s). While disconnected, QoS 1
        messages stay queued and are sent after the reconnect; waiting then returns False.
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.last_error = mqtt.error_string(info.rc)
            log.warning("publish to %s failed: %s", topic, self.last_error)
            return False
        if not wait_s:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if info.is_published():
                return True
            time.sleep(0.005)
        return info.is_published()

    # ---- paho callbacks (network thread) ----------------------------------------------------------
    def _on_connect(self, client: Any, _ud: Any, flags: Any, reason_code: Any, _props: Any = None) -> None:
        if getattr(reason_code, "is_failure", False):
            self.last_error = str(reason_code)
            log.warning("mqtt connect refused %s:%d reason=%s", self.host, self.port, reason_code)
            return
        with self._lock:
            subs = list(self._subs.items())
        if subs:  # always re-send: the broker may have lost the session (restart without persistence)
            client.subscribe([(f, q) for f, (q, _h, _d) in subs])
        with self._lock:
            self._conn_gen += 1
        self.connect_count += 1
        self.connect_failures = 0
        self.connected_at = time.monotonic()
        self.connected.set()
        log.info(
            "mqtt connected %s:%d client=%s session_present=%s subs=%d",
            self.host, self.port, self.client_id, getattr(flags, "session_present", None), len(subs),
        )
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("on_connect callback failed")

    def _on_connect_error(self, exc: BaseException) -> None:
        """A connect attempt failed (paho retries with backoff, min..max doubling): say where and why.
        Logged as a warning on the first failure, when the reason changes, and then at attempts
        1, 2, 4, 8, ... (debug in between), so a long outage does not flood the log."""
        reason = connect_error_reason(exc)
        changed = reason != self.last_error
        self.last_error = reason
        self.connect_failures += 1
        n = self.connect_failures
        delay = min(self._reconnect_min_s * 2 ** (n - 1), self._reconnect_max_s)
        loud = (changed or n & (n - 1) == 0) and not self._quiet_failures
        log.log(logging.WARNING if loud else logging.DEBUG,
                "mqtt cannot connect to %s:%d: %s; attempt %d, retrying in %.1f s (backoff up to %.0f s)",
                self.host, self.port, reason, n, delay, self._reconnect_max_s)  # fmt: skip

    def _on_disconnect(self, _c: Any, _ud: Any, _flags: Any, reason_code: Any, _props: Any = None) -> None:
        self.connected.clear()
        with self._lock:
            self._conn_gen += 1
            waits, self._unsub_waits = list(self._unsub_waits.values()), {}
            for f, done in waits:  # no UNSUBACK will come: the broker drops our subscriptions or resends
                self._subs.pop(f, None)
                done.set()
        log.info("mqtt disconnected %s:%d reason=%s (paho reconnects)", self.host, self.port, reason_code)

    def _on_unsubscribe(self, _c: Any, _ud: Any, mid: int, *_rest: Any) -> None:
        with self._lock:
            f, done = self._unsub_waits.pop(mid, (None, None))
            if f is not None:
                self._subs.pop(f, None)
        if done is not None:
            done.set()

    def _on_message(self, _c: Any, _ud: Any, msg: Any) -> None:
        self.last_delivery_at = time.monotonic()
        with self._lock:
            subs = list(self._subs.items())
            gen = self._conn_gen
        payload = bytes(msg.payload)
        matched = [(f, h, d) for f, (_q, h, d) in subs if mqtt.topic_matches_sub(_strip_share(f), msg.topic)]
        n_deferred = sum(1 for *_x, d in matched if d) if self.manual_ack else 0
        share = self._acker(msg.mid, msg.qos, gen, n_deferred) if n_deferred else None
        for f, handler, deferred in matched:
            ack = share() if deferred and share is not None else None
            try:
                if ack is not None:
                    handler(msg.topic, payload, ack)
                else:
                    handler(msg.topic, payload)
            except Exception:  # a handler bug must not kill the network thread (nor leave the message unacked)
                log.exception("handler for %s failed on topic=%s", f, msg.topic)
                if ack is not None:
                    ack()
        if self.manual_ack and not n_deferred:
            self._send_ack(msg.mid, msg.qos, gen)

    def _acker(self, mid: int, qos: int, gen: int, waiting: int) -> Callable[[], Ack]:
        """Per delivery: a factory of once-only ack() callables, one per deferred handler; the
        PUBACK goes out when all of them were called."""
        left = [waiting]

        def make() -> Ack:
            called = [False]

            def ack() -> None:
                with self._lock:
                    if called[0]:
                        return
                    called[0] = True
                    left[0] -= 1
                    if left[0] > 0:
                        return
                self._send_ack(mid, qos, gen)

            return ack

        return make

    def _send_ack(self, mid: int, qos: int, gen: int) -> None:
        """PUBACK unless the connection changed since the delivery (packet ids are per connection)."""
        if qos == 0:
            return
        with self._lock:
            stale = gen != self._conn_gen
        if stale:
            log.debug("stale ack dropped mid=%d (reconnected since delivery)", mid)
            return
        self.client.ack(mid, qos)
