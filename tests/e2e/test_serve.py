"""`koala serve` as an OS process configured only through KOALA_* env (Settings): it migrates the
database, connects to the broker with its Last Will, reports ready, announces itself retained on
`server/status`, and says offline when stopped. No device is online, so no round starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.mosquitto


def _retained_server_status(port: int) -> dict:
    out = subprocess.run([shutil.which("mosquitto_sub") or "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port),
                          "-t", "koala/v1/server/status", "-C", "1", "-W", "5"], capture_output=True, timeout=30)  # fmt: skip
    return json.loads(out.stdout.decode().split("\n")[0])


def test_koala_serve_from_env(tmp_path, mosquitto_broker):
    from server_app.demo.fleet_data import prepare_fleet
    from server_app.transport.broker import free_port

    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub not installed")
    layout = prepare_fleet(tmp_path, dataset="digits", devices=1, proxy_size=64, broker_url=mosquitto_broker.url)
    port = free_port()
    env = {
        **os.environ,
        "KOALA_BROKER__URL": mosquitto_broker.url,
        "KOALA_BROKER__CLIENT_ID": "koala-serve-test",
        "KOALA_DATABASE__URL": f"sqlite:///{tmp_path / 'serve.db'}",
        "KOALA_PATHS__PROXY_PATH": layout.proxy_path,
        "KOALA_PATHS__TEST_PATH": layout.test_path,
        "KOALA_PATHS__ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "KOALA_API__PORT": str(port),
        "KOALA_POLICY__ROUNDS": "1",
        "KOALA_LOG_FORMAT": "json",
    }
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    p = subprocess.Popen([sys.executable, "-m", "server_app.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t_end = time.monotonic() + 90
        ready = None
        while time.monotonic() < t_end and p.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if r.status_code == 200 and r.json()["status"] == "ok":
                    ready = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert ready is not None, (tmp_path / "serve.log").read_text()[-3000:]
        assert ready["checks"] == {"database": True, "mqtt": True, "intake": True, "orchestrator": True, "leader": True}
        assert _retained_server_status(mosquitto_broker.port)["state"] == "online"
        assert (tmp_path / "serve.db").is_file()
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    assert _retained_server_status(mosquitto_broker.port)["state"] == "offline"
    # KOALA_LOG_FORMAT=json: every line the server and uvicorn wrote is one JSON object with fields
    lines = [ln for ln in (tmp_path / "serve.log").read_text().splitlines() if ln.strip()]
    docs = [json.loads(ln) for ln in lines]
    assert {"ts", "level", "logger", "msg"} <= set(docs[0])
    serving = next(d for d in docs if d["logger"] == "koala.serve")
    assert serving["api"] == f"http://127.0.0.1:{port}"
    assert any(d["logger"].startswith("uvicorn") for d in docs)
    assert any(d["logger"] == "koala.serve" and d["msg"] == "stopping (Ctrl-C again to force)..." for d in docs)  # issue 29
