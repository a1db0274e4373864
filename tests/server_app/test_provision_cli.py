"""`koala provision` end to end against the SQL registry and a real Mosquitto from its own config.

add -> broker-files -> mosquitto -c DIR/mosquitto.conf -> the device connects over TLS with its
secret; rotate -> the old secret is refused; revoke (live over $CONTROL via --pid-file) -> refused.
The registry keeps only the `$7$` hash.
"""

from __future__ import annotations

import ssl
import subprocess
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from server_app.cli import main as koala
from server_app.provisioning.local_broker import find_mosquitto, free_port, wait_listening
from server_app.provisioning.passwords import verify
from server_app.provisioning.registry_link import get_device

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]


def can_connect(port: int, user: str, secret: str, ca: str) -> bool:
    done, ok = threading.Event(), []

    def on_connect(_c, _u, _f, rc, _p) -> None:
        ok.append(not rc.is_failure)
        done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"koala-dev-{user}")  # the id the broker binds to the account
    c.username_pw_set(user, secret)
    c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
    c.on_connect = on_connect
    c.on_disconnect = lambda *_a: done.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(10)
    c.disconnect()
    c.loop_stop()
    return bool(ok and ok[0])


def test_add_rotate_revoke_through_the_cli(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    broker = tmp_path / "broker"
    tls_port, plain_port = free_port(), free_port()
    for dev in ("pi-1", "pi-2"):
        assert (
            koala(
                [
                    "provision",
                    "--db",
                    db,
                    "add",
                    dev,
                    "--arch",
                    "cnn_small",
                    "--secret-file",
                    str(tmp_path / dev),
                ]
            )
            == 0
        )
    assert (
        koala(
            [
                "provision",
                "--db",
                db,
                "broker-files",
                "--out",
                str(broker),
                "--tls-port",
                str(tls_port),
                "--tls-bind",
                "127.0.0.1",
                "--plain-port",
                str(plain_port),
            ]
        )
        == 0
    )
    secret1 = (tmp_path / "pi-1").read_text().strip()
    stored = get_device(db, "pi-1")
    assert stored.has_credentials and not stored.revoked
    assert secret1 not in (broker / "passwd").read_text()
    assert "user pi-1" in (broker / "acl").read_text()

    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(broker / "mosquitto.conf")], stderr=subprocess.DEVNULL
    )
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(str(proc.pid))
    try:
        wait_listening(tls_port, proc=proc)
        ca = str(broker / "certs" / "ca.crt")
        assert can_connect(tls_port, "pi-1", secret1, ca)

        assert (
            koala(
                [
                    "provision",
                    "--db",
                    db,
                    "rotate",
                    "pi-1",
                    "--secret-file",
                    str(tmp_path / "pi-1.new"),
                    "--broker-dir",
                    str(broker),
                    "--pid-file",
                    str(pid_file),
                ]
            )
            == 0
        )
        secret1b = (tmp_path / "pi-1.new").read_text().strip()
        assert not can_connect(tls_port, "pi-1", secret1, ca)
        assert can_connect(tls_port, "pi-1", secret1b, ca)

        assert (
            koala(
                [
                    "provision",
                    "--db",
                    db,
                    "revoke",
                    "pi-1",
                    "--broker-dir",
                    str(broker),
                    "--pid-file",
                    str(pid_file),
                ]
            )
            == 0
        )
        assert not can_connect(tls_port, "pi-1", secret1b, ca)
        assert get_device(db, "pi-1").revoked
        assert "pi-1" not in (broker / "acl").read_text()
        assert can_connect(tls_port, "pi-2", (tmp_path / "pi-2").read_text().strip(), ca)
    finally:
        proc.terminate()
        proc.wait(10)


def test_registry_stores_only_the_mosquitto_hash(tmp_path) -> None:
    from sqlalchemy import create_engine, text

    db = f"sqlite:///{tmp_path / 'r.db'}"
    koala(
        ["provision", "--db", db, "add", "pi-9", "--arch", "mlp_tiny", "--secret-file", str(tmp_path / "s")]
    )
    secret = (tmp_path / "s").read_text().strip()
    with create_engine(db).connect() as conn:
        stored = conn.execute(text("select credentials_hash from devices where id='pi-9'")).scalar_one()
    assert stored.startswith("$7$") and secret not in stored and verify(secret, stored)


@pytest.mark.parametrize("bad", ["a/b", "a+b", "x#", "has space", "koala-server", "koala-admin", ""])
def test_unsafe_device_ids_are_refused(tmp_path, bad, capsys) -> None:
    rc = koala(["provision", "--db", f"sqlite:///{tmp_path / 'r.db'}", "add", bad, "--arch", "cnn_small"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_arch_and_unknown_device_are_one_line_errors(tmp_path, capsys) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    assert koala(["provision", "--db", db, "add", "pi-1", "--arch", "resnet_huge"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mlp_tiny" in err and "Traceback" not in err
    assert koala(["provision", "--db", db, "revoke", "nobody"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not registered" in err
    for arch in ("mlp_tiny", "cnn_small", "mobilenet_tiny", "mobilenet_micro"):
        assert koala(["provision", "--db", db, "add", f"pi-{arch}", "--arch", arch]) == 0
