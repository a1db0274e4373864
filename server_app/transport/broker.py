"""Embedded MQTT brokers behind one small interface, for the zero-setup profile and for tests.

Why two: a private Mosquitto (subprocess, generated config) behaves exactly like production and has
MQTT 5, `$share` shared subscriptions and offline queueing; where the binary is missing, amqtt runs
in-process but speaks MQTT 3.1.1 only, drops `$share` silently and queues nothing for anonymous
offline sessions. `features` says which is which so callers fail loudly instead of silently
(e.g. run one ingestion worker when shared_subscriptions is False). Both bind 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
DEFAULT_MAX_PACKET = 16 * 1024 * 1024  # large enough for a FedAvg-small assignment with logits
# The server's results subscription must be able to queue a whole round: Mosquitto drops QoS 1
# messages beyond these per-client limits (only global limits in 2.0; devices hold ~1 assignment
# each, so a high limit costs them nothing). See broker_config/README.md for the sizing.
MAX_QUEUED_MESSAGES = 10_000  # >= results of one round of the largest fleet we test (1,500) x 2 redeliveries
MAX_INFLIGHT_MESSAGES = 100  # broker -> v3.1.1 client window: caps the server's ingest batch (manual ack)


@dataclass(frozen=True)
class BrokerFeatures:
    v5: bool
    shared_subscriptions: bool
    offline_queueing: bool
    max_packet_size: int | None = None


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """True once a TCP connect succeeds (the broker is accepting), False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


class BrokerError(RuntimeError):
    """The embedded broker could not start (binary missing, port busy, bad config)."""


class EmbeddedBroker:
    """start()/stop() a broker on LOOPBACK; `url`, `host`, `port`, `features` describe it."""

    name = "abstract"
    host: str = LOOPBACK
    port: int = 0
    features: BrokerFeatures

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:  # pragma: no cover - interface
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def running(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- Mosquitto -------------------------------------------------------------------------------------
def find_mosquitto_binary() -> str | None:
    """KOALA_MOSQUITTO, then PATH, then Debian's /usr/sbin/mosquitto (not on a user's PATH)."""
    for cand in (os.environ.get("KOALA_MOSQUITTO"), shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class MosquittoBroker(EmbeddedBroker):
    """A private Mosquitto subprocess from a generated config (no root, no system files touched)."""

    name = "mosquitto"

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: str | Path | None = None,
        binary: str | None = None,
        password_file: str | Path | None = None,
        acl_file: str | Path | None = None,
        allow_anonymous: bool | None = None,
        persistence: bool = True,
        max_packet_size: int = DEFAULT_MAX_PACKET,
        max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        extra_config: str = "",
        config_file: str | Path | None = None,
        ready_ports: tuple[int, ...] = (),
    ) -> None:
        self.binary = binary or find_mosquitto_binary()
        # a config written by someone else (the hardened production config of `koala provision`):
        # started as is, ready when every port in `ready_ports` accepts connections
        self.config_file = Path(config_file) if config_file else None
        self.ready_ports = tuple(ready_ports)
        self.port = port or 0
        self._fixed_port = port is not None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="koala-mosquitto-"))
        self.password_file = Path(password_file) if password_file else None
        self.acl_file = Path(acl_file) if acl_file else None
        # dev default: anonymous when no password file is given
        self.allow_anonymous = self.password_file is None if allow_anonymous is None else allow_anonymous
        self.persistence = persistence
        self.max_packet_size = max_packet_size
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.extra_config = extra_config
        self.features = BrokerFeatures(v5=True, shared_subscriptions=True, offline_queueing=True, max_packet_size=max_packet_size)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def render_config(self) -> str:
        lines = [
            "# generated by server_app.transport.broker.MosquittoBroker",
            "per_listener_settings false",
            f"listener {self.port} {LOOPBACK}",
            "protocol mqtt",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"max_packet_size {self.max_packet_size}",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            "max_queued_bytes 0",  # bounded by the message count; a dev/test broker
            "set_tcp_nodelay true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # started as root, Mosquitto would switch to user `mosquitto` and lose access to our
            # workdir, log and password files: stay the user that started it
            lines.append("user root")
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        return "\n".join(lines) + "\n" + self.extra_config + "\n"

    def start(self) -> MosquittoBroker:
        if self.running:
            return self
        if self.binary is None:
            raise BrokerError("mosquitto binary not found (install mosquitto or set KOALA_MOSQUITTO)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port or self.config_file else 3
        for attempt in range(attempts):
            if not self._fixed_port and not self.config_file:
                self.port = free_port()
            if self.config_file is None:
                self.config_path.write_text(self.render_config())
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_file or self.config_path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it in order
            )
            if self._wait_ready():
                log.info("private mosquitto on %s (pid %d, dir %s)", self.url, self._proc.pid, self.workdir)
                return self
            err = self._reap()
            log.warning("mosquitto failed to start on port %d (attempt %d): %s", self.port, attempt + 1, err)
        raise BrokerError(f"mosquitto did not start on {LOOPBACK}:{self.port}; see {self.log_path}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        pending = list(self.ready_ports or (self.port,))
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            if wait_for_port(LOOPBACK, pending[0], timeout=0.2):
                pending.pop(0)
                if not pending:
                    return True
        return False

    def _reap(self) -> str:
        if self._proc is None:
            return ""
        if self._proc.poll() is None:
            self._proc.kill()
        _out, err = self._proc.communicate(timeout=5)
        self._proc = None
        return (err or b"").decode(errors="replace").strip()[-500:]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM: persistence is saved), then SIGKILL if it lingers."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout)
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash: clients see their connection drop; Last Wills fire on restart only
        for sessions the broker still knew (tests use this to prove reconnect)."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(5)
        self.stop()

    def reload(self) -> None:
        """SIGHUP: re-read password and ACL files (after provisioning or revocation)."""
        if self.running and self._proc is not None:
            os.kill(self._proc.pid, signal.SIGHUP)

    def restart(self) -> MosquittoBroker:
        """Stop and start again on the same port (persisted sessions and retained messages survive)."""
        self.stop()
        self._fixed_port = True
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---- amqtt ----------------------------------------------------------------------------------------
class AmqttBroker(EmbeddedBroker):
    """amqtt 0.12 in a background thread with its own event loop: MQTT 3.1.1, no $share."""

    name = "amqtt"

    def __init__(self, *, port: int | None = None, allow_anonymous: bool = True) -> None:
        self.port = port or 0
        self.allow_anonymous = allow_anonymous
        self.features = BrokerFeatures(v5=False, shared_subscriptions=False, offline_queueing=False, max_packet_size=None)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def config(self) -> dict[str, Any]:
        # A `plugins` key replaces all default plugins: keep auth, drop the $SYS and packet loggers.
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": self.allow_anonymous}},
        }

    def start(self) -> AmqttBroker:
        if self.running:
            return self
        if not self.port:
            self.port = free_port()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=f"amqtt-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise BrokerError(f"amqtt did not start on {LOOPBACK}:{self.port}: {self._error!r}")
        if not wait_for_port(LOOPBACK, self.port, 5):
            raise BrokerError(f"amqtt is not accepting on {LOOPBACK}:{self.port}")
        log.info("embedded amqtt on %s (MQTT 3.1.1 only, no shared subscriptions)", self.url)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            from amqtt.broker import Broker

            self._broker = Broker(self.config())  # must be built inside the running loop
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # reported to start() via _error
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop = self._loop
        if self._broker is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(10)
            except Exception as exc:  # shutting down anyway
                log.warning("amqtt shutdown: %r", exc)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop = None
        self._broker = None


def make_embedded_broker(prefer: str = "mosquitto", **kwargs: Any) -> EmbeddedBroker:
    """Private Mosquitto when the binary exists (or prefer='amqtt' is asked for), else amqtt. Logs the choice."""
    if prefer not in ("mosquitto", "amqtt"):
        raise ValueError(f"prefer must be 'mosquitto' or 'amqtt', not {prefer!r}")
    if prefer == "mosquitto" and find_mosquitto_binary():
        log.info("embedded broker: private Mosquitto (%s)", find_mosquitto_binary())
        return MosquittoBroker(**kwargs)
    if prefer == "mosquitto":
        log.warning("embedded broker: mosquitto not found, falling back to amqtt (MQTT 3.1.1 only, no $share)")
    else:
        log.info("embedded broker: amqtt (MQTT 3.1.1 only, no $share)")
    return AmqttBroker(port=kwargs.get("port"))
