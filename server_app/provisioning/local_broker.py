"""Run a private, hardened Mosquitto on free loopback ports from a generated broker directory.

Used by the test-suite and `scripts/local_stack.sh` so that what they exercise is the production
config (TLS, password file, ACL), not the system broker and not the anonymous dev config. It never
touches /etc/mosquitto: the binary is started with `-c` on a config rendered into its own dir.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from server_app.provisioning.broker_conf import BrokerConf, local_user
from server_app.provisioning.broker_files import BrokerFiles, DeviceCredential, write_broker_files
from server_app.transport.broker import MosquittoBroker, find_mosquitto_binary, free_port

# One launcher: the process management is server_app.transport.broker.MosquittoBroker's.
find_mosquitto = find_mosquitto_binary


def wait_listening(port: int, timeout_s: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts TCP on 127.0.0.1:port (the broker finished starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port}") from None
            time.sleep(0.02)


@dataclass
class PrivateMosquitto:
    """A Mosquitto child process serving `broker_dir` (TLS on tls_port, plain on plain_port)."""

    broker_dir: Path
    tls_port: int = field(default_factory=free_port)
    plain_port: int = field(default_factory=free_port)
    binary: str | None = None
    files: BrokerFiles | None = None
    broker: MosquittoBroker | None = None

    @property
    def pid_file(self) -> Path:
        return self.broker_dir / "mosquitto.pid"

    @property
    def log_file(self) -> Path:
        return self.broker_dir / "mosquitto.log"

    def write_files(self, devices: list[DeviceCredential]) -> BrokerFiles:
        conf = BrokerConf(
            conf_dir=self.broker_dir,
            data_dir=self.broker_dir / "data",
            tls_port=self.tls_port,
            tls_bind="127.0.0.1",
            server_port=self.plain_port,
            run_as_user=local_user(),
            log_dest=f"file {self.log_file}",
        )
        (self.broker_dir / "data").mkdir(parents=True, exist_ok=True)
        self.files = write_broker_files(self.broker_dir, devices, conf)
        return self.files

    def start(self) -> PrivateMosquitto:
        binary = self.binary or find_mosquitto()
        if not binary:
            raise FileNotFoundError("mosquitto binary not found (apt-get install mosquitto)")
        assert self.files and self.files.conf, "call write_files() first"
        self.broker = MosquittoBroker(port=self.plain_port, workdir=self.broker_dir, binary=binary,
                                      config_file=self.files.conf, ready_ports=(self.tls_port, self.plain_port))  # fmt: skip
        self.broker.start()
        self.pid_file.write_text(f"{self.broker.pid}\n")
        return self

    @property
    def pid(self) -> int | None:
        return None if self.broker is None else self.broker.pid

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop(timeout=10.0)

    def __enter__(self) -> PrivateMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
