"""deploy/koala-server.service (systemd unit for `koala serve`) passes `systemd-analyze verify`
and runs the server with the config file and the broker secret as a credential."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "koala-server.service"


def test_server_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "koala serve --config /etc/koala/server.toml" in text
    assert "LoadCredential=broker-password:" in text and "KOALA_BROKER__PASSWORD=" not in text.split("ExecStart")[0]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    check = tmp_path / UNIT.name
    check.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(check)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Unknown" not in out.stderr, out.stdout + out.stderr
