"""The README's "Production, step by step" block, run verbatim: manifest -> `koala data prepare` ->
`koala provision fleet` -> Mosquitto from the generated config -> `koala serve` on PostgreSQL ->
every bundle flashed into a staging root and its agent started from the installed venv -> a round
completes -> `koala rounds ls` shows it.

The script is cut out of README.md between its markers and run by bash as it stands; only the
variables its first lines read (workspace, ports, bind address, database URL) are set here, so
the test uses free loopback ports and a scratch PostgreSQL database. Afterwards the registry is
read directly: what the README promised happened there too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from server_app.provisioning.local_broker import find_mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- production-walkthrough:begin -->", "<!-- production-walkthrough:end -->"
DEVICES = ("pi-01", "pi-02", "pi-03")

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.postgres,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]


def walkthrough_script(readme: Path = REPO / "README.md") -> str:
    """The bash block between the README's walk-through markers, exactly as written there."""
    body = readme.read_text()
    block = body[body.index(BEGIN) + len(BEGIN) : body.index(END)]
    m = re.search(r"```bash\n(.*?)```", block, re.S)
    assert m, "the walk-through markers must hold one ```bash block"
    return m.group(1)


def test_readme_block_is_the_whole_path() -> None:
    """Every step the issue names is in the block the e2e test runs (not in prose around it)."""
    script = walkthrough_script()
    for step in ("koala data prepare", "koala provision fleet", "mosquitto -c broker/mosquitto.conf",
                 "koala serve --config server.toml", "flash.sh", "koala-device run", "koala rounds ls",
                 "koala models export", "koala models small",
                 "koala-device check", "koala monitor --broker \"mqtts://", "--password-file broker/secrets/koala-monitor"):  # fmt: skip
        assert step in script, step
    commands = [ln for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(commands) < 40


def test_readme_production_walkthrough(tmp_path, pg_database_url) -> None:
    home = tmp_path / "fleet"
    env = {
        **os.environ,
        "KOALA_HOME": str(home),
        "BROKER_HOST": "127.0.0.1",
        "BIND": "127.0.0.1",
        "TLS_PORT": str(free_port()),
        "PLAIN_PORT": str(free_port()),
        "HTTP_PORT": str(free_port()),
        "DB_URL": pg_database_url,
        "PYTHONUNBUFFERED": "1",
    }
    script = tmp_path / "walkthrough.sh"
    script.write_text("set -euo pipefail\n" + walkthrough_script())
    out = run_script_in_group(["bash", str(script)], env, 1500, "README walk-through", lambda: _logs(home))

    # `koala rounds ls` printed a completed round
    assert re.search(r"^\d+\s+completed\s", out, re.M), out[-3000:]
    # the registry agrees: a completed round whose accepted results came from flashed devices
    with create_engine(pg_database_url).connect() as conn:
        states = dict(conn.execute(text("select id, state from rounds")).all())
        accepted = conn.execute(text(
            "select distinct device_id from assignments where status = 'accepted'")).scalars().all()  # fmt: skip
        registered = set(conn.execute(text("select id from devices")).scalars().all())
    assert "completed" in states.values(), states
    assert registered == set(DEVICES)
    assert len(accepted) >= 2 and set(accepted) <= set(DEVICES), accepted
    # step 8: the trained models are out, in the formats asked for
    models = home / "models"
    assert {"model.safetensors", "model.json", "model.onnx", "cnn_small.int8.tflite"} <= {p.name for p in models.iterdir()}, \
        sorted(p.name for p in models.iterdir())
    assert json.loads((models / "model.json").read_text())["input"]["shape"] == [28, 28, 1]
    # what the steps left behind: the generated settings hold no secret; devices hold no server code
    settings = (home / "server.toml").read_text()
    secret = (home / "broker" / "secrets" / "koala-server.password").read_text().strip()
    assert secret not in settings and (home / "api.token").read_text().strip() not in settings
    assert (home / "api.token").stat().st_mode & 0o077 == 0
    for dev in DEVICES:
        cfg = json.loads((home / "devices" / dev / "etc/koala/device.json").read_text())
        assert cfg["data_path"] == str(home / "devices" / dev / "var/lib/koala/data.npz")
        site = next((home / "devices" / dev / "opt/koala/venv/lib").glob("python3*/site-packages"))
        assert not (site / "server_app").exists() and not (site / "scipy").exists()


def run_script_in_group(argv: list[str], env: dict[str, str], timeout_s: float, what: str,
                        logs: Callable[[], str]) -> str:  # fmt: skip
    """Run a shell script that starts long-lived services (broker, server, agents) in its own
    process group; return its output once it exits 0. Whatever it leaves running is stopped, on
    success, failure or timeout alike; a failure shows the output's tail and the services' logs."""
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish:\n{out[-4000:]}\n{logs()}")
    finally:
        _stop_group(proc.pid)
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{out[-6000:]}\n{logs()}"
    print(f"{what}: {time.monotonic() - t0:.0f} s")
    return out


def _stop_group(pgid: int) -> None:
    """The script leaves the broker, the server and three agents running in its process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


def _logs(home: Path) -> str:
    parts = []
    for log in [home / "server.log", home / "broker" / "mosquitto.log", *sorted((home / "devices").glob("*.log"))]:
        if log.exists():
            parts.append(f"--- {log.name}\n{log.read_text()[-2000:]}")
    return "\n".join(parts)
