"""Helpers of the reliability tests (imported by name: `conftest` is shadowed by tests/conftest.py).

Everything here drives *real* components on loopback: the real `ServerServices` as its own OS
process (`rel_server.py`, so it can be SIGKILLed), registry reads with a fresh engine (what was
committed, never the server's session), and a bare paho publisher for crafted payloads.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SMALL_LARGE = {"width": 8, "options": {"fc": 32}}  # LargeCNN: a few thousand parameters on 8x8 inputs
# The reliability server's policy: logits-only KOALA (simulated devices can answer it), small and quick.
POLICY: dict[str, Any] = {"strategy": "koala_homo", "teacher": "device_logits", "large": SMALL_LARGE, "rounds": 3,
                          "deadline_s": 30.0, "min_devices": 1, "quorum_fraction": 0.5}  # fmt: skip


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str = "condition", step: float = 0.1) -> Any:
    """Poll until cond() is truthy; fail the test with `what` on timeout (behaviour, not timing)."""
    t_end = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(step)


def server_options(db_url: str, data_dir: Path, files: dict[str, str], port: int, **kw: Any) -> Any:
    """ServerOptions for a logits-only KOALA server on digits (simulated devices can answer it).
    Keyword arguments that are KoalaPolicy fields (rounds, deadline_s, min_devices, ...) change the
    policy; the others are ServerOptions fields."""
    from server_app.policy import KoalaPolicy
    from server_app.services import ServerOptions

    policy = {**POLICY, **{k: kw.pop(k) for k in list(kw) if k in KoalaPolicy.model_fields}}
    base: dict[str, Any] = dict(
        db_url=db_url, data_dir=str(data_dir), broker_port=port, shared_subscriptions=True, policy=policy,
        eval_samples=100, torch_threads=1, **files,
    )  # fmt: skip
    base.update(kw)
    return ServerOptions(**base)


def options_json(options: Any) -> str:
    """ServerOptions as JSON for rel_server.py. The policy keeps only its explicitly set fields, so
    the child's policy is the same (a field set explicitly but unused by the strategy is an error)."""
    d = asdict(options)
    d["policy"] = options.policy.model_dump(mode="json", exclude_unset=True)
    return json.dumps(d)


class ServerProcess:
    """`rel_server.py` as a child process: start() waits for READY; kill() is SIGKILL."""

    def __init__(self, options: Any, workdir: Path):
        self.options = options
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server{self.starts}.log"

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        return self.spawn().wait_ready()

    def spawn(self) -> ServerProcess:
        """Start the child without waiting for READY (a standby prints it only once it leads)."""
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        opts = self.workdir / "server_options.json"
        opts.write_text(options_json(self.options))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, str(HERE / "rel_server.py"), str(opts)], stdout=subprocess.PIPE,
                                     stderr=log, env=env, cwd=REPO)  # fmt: skip
        log.close()
        return self

    def wait_ready(self) -> ServerProcess:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until READY or the child dies
        if b"READY" not in line:
            self.proc.wait(10)
            raise AssertionError(f"server did not start:\n{self.log_path.read_text()[-3000:]}")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return "".join((self.workdir / f"server{i}.log").read_text() for i in range(1, self.starts + 1))


class Db:
    """Read-only views over a registry URL (a new Registry each time: never the server's session)."""

    def __init__(self, url: str):
        from server_app.registry import Registry

        self.reg = Registry(url)

    def rounds(self) -> dict[int, Any]:
        from server_app.registry import crud

        return {r.id: r for r in self.reg.run(crud.list_rounds, limit=crud.MAX_PAGE)}

    def assignments(self, round_id: int | None = None) -> list[Any]:
        from server_app.registry import crud

        return list(self.reg.run(crud.list_assignments, round_id=round_id, limit=crud.MAX_PAGE))

    def rejections(self) -> list[dict[str, Any]]:
        from sqlalchemy import select

        from server_app.registry.models import Event

        def fn(s: Any) -> list[dict[str, Any]]:
            rows = s.scalars(select(Event).where(Event.kind == "rejected").order_by(Event.id))
            return [{"device_id": e.device_id, "round_id": e.round_id, **(e.detail or {})} for e in rows]

        return self.reg.run(fn)

    def models(self) -> list[Any]:
        from sqlalchemy import select

        from server_app.registry.models import ModelVersion

        return list(self.reg.run(lambda s: list(s.scalars(select(ModelVersion).order_by(ModelVersion.version)))))

    def close(self) -> None:
        self.reg.dispose()


class RawPublisher:
    """A bare paho client: publishes exactly the bytes a test crafts (no contract codec in between)."""

    def __init__(self, host: str, port: int, client_id: str = "rel-raw", **auth: Any):
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if auth:
            self.client.username_pw_set(auth["username"], auth.get("password"))
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        self.sent = 0

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(15)
        self.sent += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class TcpProxy:
    """A loopback TCP forwarder the test controls: `cut()` drops every live connection and refuses
    new ones (accept + close) until `restore()`. Stands between the server and PostgreSQL to make
    "the database is briefly unreachable" a real network fault, not a mocked exception."""

    def __init__(self, target_host: str, target_port: int):
        import socket
        import threading

        self.target = (target_host, target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.is_cut = False
        self.refused = 0
        self.conns: list[Any] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.is_cut:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        import socket

        self.is_cut = True
        with self._lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.is_cut = False

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.sock.close()
