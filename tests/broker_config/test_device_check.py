"""`koala-device check` against a private hardened broker (TLS + passwords + ACL + bound client ids):
a device owner learns whether TLS, credentials and the broker work, step by step (issue 29).
Also: a missing CA file is one line naming the path and the config key (no FileNotFoundError)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_probe import Probe

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from server_app.provisioning.identity import SERVER_ACCOUNT


@pytest.fixture(scope="module")
def online(fleet):
    """The server's retained status on the broker, as a running `koala serve` leaves it."""
    s = Probe(fleet.broker.plain_port, SERVER_ACCOUNT, fleet.secrets[SERVER_ACCOUNT]).connect()
    s.publish(topics.server_status(), codec.encode(cm.ServerStatus("online", version="test")), retain=True)
    s.close()
    return fleet


def _config(tmp: Path, fleet, **over) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "data.npz").write_bytes(b"x")
    (tmp / "proxy.npy").write_bytes(b"proxy")
    pw = tmp / "device.password"
    pw.write_text(fleet.secrets["dev-a"] + "\n")
    cfg = {"device_id": "dev-a", "broker_url": f"mqtts://127.0.0.1:{fleet.broker.tls_port}", "username": "dev-a",
           "password_file": str(pw), "ca_file": fleet.ca, "data_path": str(tmp / "data.npz"),
           "proxy_path": str(tmp / "proxy.npy"), "proxy_sha256": hashlib.sha256(b"proxy").hexdigest(),
           "state_dir": str(tmp / "state"), **over}  # fmt: skip
    path = tmp / "device.json"
    path.write_text(json.dumps(cfg))
    return path


def _check(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device_firmware_py.cli", "check", "--config", str(config),
                           "--timeout", "5", *extra], capture_output=True, text=True, timeout=120)  # fmt: skip


def test_check_passes_on_a_good_setup(online, tmp_path):
    p = _check(_config(tmp_path, online))
    assert p.returncode == 0, p.stdout + p.stderr
    for step in ("config", "ca_file", "password", "data_path", "proxy_path", "tcp", "tls", "mqtt", "subscribe", "server"):
        assert any(line.startswith("ok") and line.split()[1] == step for line in p.stdout.splitlines()), (step, p.stdout)
    assert "client id koala-dev-dev-a" in p.stdout and "certificate trusted" in p.stdout and "online" in p.stdout
    assert p.stdout.rstrip().endswith("all checks passed")


def test_check_names_what_is_wrong(online, tmp_path):
    # wrong password: CONNECT refused, with what to do
    cfg = _config(tmp_path / "pw", online)
    (tmp_path / "pw" / "device.password").write_text("not-the-secret\n")
    p = _check(cfg)
    assert p.returncode == 1 and "FAIL  mqtt" in p.stdout and "CONNECT refused" in p.stdout, p.stdout
    assert "ok    tls" in p.stdout  # the steps before it passed
    # missing CA file: named with its key and the config file; the network steps are skipped
    missing = tmp_path / "nope" / "ca.crt"
    cfg = _config(tmp_path / "ca", online, ca_file=str(missing))
    p = _check(cfg)
    assert p.returncode == 1 and f"CA file {missing} not found (ca_file in {cfg})" in p.stdout, p.stdout
    assert "--    tcp" in p.stdout and "Traceback" not in p.stdout + p.stderr
    # wrong port (the plain listener, no TLS there): the TLS handshake fails and says what to check
    cfg = _config(tmp_path / "port", online, broker_url=f"mqtts://127.0.0.1:{online.broker.plain_port}")
    p = _check(cfg)
    assert p.returncode == 1 and "FAIL  tls" in p.stdout and "TLS listener" in p.stdout, p.stdout
    # nothing listening at all
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = _check(_config(tmp_path / "closed", online, broker_url=f"mqtts://127.0.0.1:{port}"))
    assert p.returncode == 1 and "FAIL  tcp" in p.stdout and "connection refused" in p.stdout, p.stdout
    # a CA that did not sign the broker's certificate (the system's CA bundle)
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    if system.is_file():
        p = _check(_config(tmp_path / "otherca", online, ca_file=str(system)))
        assert p.returncode == 1 and "FAIL  tls         certificate not accepted" in p.stdout, p.stdout
        assert "the fleet's CA" in p.stdout


def test_agent_with_a_missing_ca_file_says_which(online, tmp_path):
    """`koala-device run` with ca_file pointing nowhere: exit 2 and one line naming the file and the key,
    not paho's FileNotFoundError without the path."""
    missing = tmp_path / "certs" / "ca.crt"
    cfg = _config(tmp_path, online, ca_file=str(missing))
    p = subprocess.run([sys.executable, "-m", "device_firmware_py.cli", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 2 and f"CA file {missing} not found (ca_file in {cfg})" in out, out
    assert "Traceback" not in out and "FileNotFoundError" not in out
