"""Run a private, hardened Mosquitto on free loopback ports from a generated broker directory.

Used by the test-suite and `scripts/local_stack.sh` so that what they exercise is the production
config (TLS, password file, ACL), not the system broker and not the anonymous dev config. It never
touches /etc/mosquitto: the binary is started with `-c` on a config rendered into its own dir.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from server_app.provisioning.broker_conf import BrokerConf, local_user
from server_app.provisioning.broker_files import BrokerFiles, DeviceCredential, write_broker_files

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    for path in (shutil.which("mosquitto"), *MOSQUITTO_CANDIDATES):
        if path and Path(path).is_file():
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    proc: subprocess.Popen | None = None
    files: BrokerFiles | None = None

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
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.files.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.pid_file.write_text(f"{self.proc.pid}\n")
        wait_listening(self.tls_port, proc=self.proc)
        wait_listening(self.plain_port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PrivateMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
