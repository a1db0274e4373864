"""scripts/local_stack.sh brings up the hardened broker + registry database from local binaries."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from server_app.provisioning.local_broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
def test_local_stack_starts_an_authenticated_broker(tmp_path) -> None:
    from mqtt_probe import Probe, Refused

    db = "koala_stack_pytest"
    env = dict(os.environ, KOALA_STACK_DB=db)
    if shutil.which("psql"):  # start from an empty database of our own; the script creates it
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-d", "postgres", "-qc", f"drop database if exists {db}"],
            capture_output=True,
        )
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "local_stack.sh"), "--no-server", "--dir", str(tmp_path / "stack")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "[stack] ready" in line:
                break
        else:
            pytest.fail(f"local_stack.sh exited {proc.wait()} before it was ready")
        values = dict(
            line.split("=", 1)
            for line in (tmp_path / "stack" / "stack.env").read_text().splitlines()
            if "=" in line
        )
        plain = int(values["KOALA_BROKER__URL"].rsplit(":", 1)[1])
        secret = Path(values["KOALA_BROKER_PASSWORD_FILE"]).read_text().strip()
        Probe(plain, "koala-server", secret).connect().close()
        with pytest.raises(Refused):
            Probe(plain).connect()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
