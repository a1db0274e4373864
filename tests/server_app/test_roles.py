"""`koala serve --role`: each role starts what it needs and nothing else, checks it in /readyz,
and refuses an inconsistent configuration with one line (docs/scale-out.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from server_app.config import ConfigError, load_settings
from server_app.services import ServerOptions, ServerServices

REPO = Path(__file__).resolve().parents[2]


def _options(tmp_path: Path, **kw) -> ServerOptions:
    base = dict(db_url=f"sqlite:///{tmp_path / 'k.db'}", data_dir=str(tmp_path / "data"), proxy_path="missing.npz",
                test_path="missing.npz", broker_port=1, leader_lock=True)  # fmt: skip
    return ServerOptions(**{**base, **kw})


def test_role_api_needs_only_the_registry(tmp_path):
    """No broker (port 1 answers nothing), no data sets: the API role starts on the registry alone."""
    s = ServerServices(_options(tmp_path, role="api"))
    s.start()
    try:
        assert s.readiness() == {"database": True}
        assert s.link is None and s.orchestrator is None and s.leader is None
    finally:
        s.stop()


@pytest.mark.mosquitto
def test_role_ingest_subscribes_results_only_and_follows_the_registry(tmp_path, mosquitto_broker):
    s = ServerServices(_options(tmp_path, role="ingest", worker_id="w1", broker_port=mosquitto_broker.port))
    s.start()
    try:
        assert s.readiness() == {"database": True, "mqtt": True, "intake": True, "round_view": True}
        assert s.orchestrator is None and s.leader is None  # no rounds, no leader lock
        assert s.link.client_id == "koala-server-ingest-w1" and not s.link.clean_session  # persistent session
        assert s.results_filter == "$share/koala-server/koala/v1/devices/+/up/result"
        assert s.follower is not None and s.follower.polls >= 1
    finally:
        s.stop()
    assert s.follower is None and s.link is None


def test_inconsistent_roles_are_refused(tmp_path):
    with pytest.raises(ValueError, match="role"):
        _options(tmp_path, role="worker")
    with pytest.raises(ValueError, match="ingest"):
        _options(tmp_path, role="orchestrator", worker_id="w1")
    with pytest.raises(ConfigError, match="worker_id"):
        load_settings(None, worker_id="w1")  # role defaults to all
    with pytest.raises(ConfigError):
        load_settings(None, role="ingest", worker_id="bad id!")
    assert load_settings(None, role="ingest", worker_id="w-1").role == "ingest"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_koala_serve_role_api_process_serves_readyz(tmp_path):
    """The real command: `koala serve --role api` as a process, /readyz answers with its checks."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOALA_")}
    proc = subprocess.Popen([sys.executable, "-m", "server_app.cli", "serve", "--role", "api", "--port", str(port),
                             "--db", f"sqlite:///{tmp_path / 'k.db'}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        body = None
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    body = json.loads(r.read())
                    break
            except OSError:
                time.sleep(0.3)
        assert body is not None, proc.stdout.read().decode() if proc.poll() is not None else "no answer"
        assert body["checks"] == {"database": True}, body
    finally:
        proc.terminate()
        proc.wait(30)
