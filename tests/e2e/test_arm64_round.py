"""An arm64 device completes a KOALA round against an x86-64 server, over MQTT with TLS.

The device side is a Debian bookworm arm64 root run under qemu-user (`scripts/arm64_root.sh`;
`QEMU_CPU=cortex-a72`, a Raspberry Pi 4's core). Everything goes the way a real Pi is set up:
`koala provision fleet` builds arm64 bundles (aarch64 wheels from PyPI, `bundles.platform`), each
bundle's `flash.sh` runs *inside* the arm64 root (as `flash.sh --host` runs it on the Pi over SSH)
and creates the device venv with the root's own python3, and the agent runs from that venv as an
aarch64 process. The server, the broker (generated config, TLS) and the registry run on this host.
Two rounds with the logits upload (teacher device_logits), so every on-device phase runs: local
training, proxy logits, int8 re-quantization, and from round 1 forward KD from the large model's
logits (docs/arm64.md).

Slow (10-20 minutes on 2 shared cores, most of it emulation) and needs root, debootstrap and
qemu-user-static from Debian, and PyPI for the aarch64 wheels:
`pytest -m slow tests/e2e/test_arm64_round.py`.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
from test_production_walkthrough import run_script_in_group  # the same process-group run and teardown

from server_app.provisioning.local_broker import find_mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]
DEVICES = ("arm-01", "arm-02")

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

# the fleet manifest (written by the script below); {…} are filled from the environment by bash
MANIFEST = """name: arm64
database: {url: "sqlite:///$WS/registry.db"}
broker: {url: "mqtts://127.0.0.1:$TLS_PORT", tls_hosts: [127.0.0.1], tls_bind: 127.0.0.1, tls_port: $TLS_PORT, plain_port: $PLAIN_PORT}
bundles: {proxy: data/proxy.npz, platform: manylinux_2_36_aarch64, python_version: "3.11"}
devices:
  - {id: arm-01, arch: mlp_tiny, ship_data: data/devices/arm-01.npz}
  - {id: arm-02, arch: mlp_tiny, ship_data: data/devices/arm-02.npz}
"""

SCRIPT = r"""
set -euo pipefail
export PATH="$REPO/.venv/bin:$PATH"
cd "$WS"
envsubst < manifest.in > fleet.yml
koala data prepare --dataset fashion-mnist --manifest fleet.yml --train-size 1200 --proxy-size 300 --out data
koala provision fleet fleet.yml --out .
mosquitto -c broker/mosquitto.conf > broker/mosquitto.log 2>&1 &
KOALA_POLICY__ARCHS='["mlp_tiny"]' KOALA_POLICY__TEACHER=device_logits KOALA_POLICY__ROUNDS=2 KOALA_POLICY__MIN_DEVICES=2 \
  KOALA_POLICY__QUORUM_FRACTION=1.0 KOALA_POLICY__DEADLINE_S=1200 \
  koala serve --config server.toml --port "$HTTP_PORT" > server.log 2>&1 &
for d in arm-01 arm-02; do
  rm -rf "$R/srv/koala/$d" "$R/tmp/koala-bundle-$d"
  cp -r "bundles/koala-bundle-$d" "$R/tmp/"
  # flash.sh and the venv it creates run inside the arm64 root: aarch64 bash, python3 and wheels
  QEMU_CPU=cortex-a72 chroot "$R" bash "/tmp/koala-bundle-$d/flash.sh" --target-root "/srv/koala/$d" --in-place --install-venv
done
for d in arm-01 arm-02; do
  QEMU_CPU=cortex-a72 chroot "$R" "/srv/koala/$d/opt/koala/venv/bin/koala-device" run \
    --config "/srv/koala/$d/etc/koala/device.json" > "$d.log" 2>&1 &
done
koala rounds wait --api "http://127.0.0.1:$HTTP_PORT" --token-file api.token --count 2 --timeout 1800
koala rounds ls --api "http://127.0.0.1:$HTTP_PORT" --token-file api.token
# the int8 re-quantization runs after the result is sent (half a minute under emulation): wait for
# a model newer than the last round's completion
touch rounds.done
for d in arm-01 arm-02; do
  for _ in $(seq 900); do
    [ "$R/srv/koala/$d/var/lib/koala/state/model_int8.tflite" -nt rounds.done ] && break; sleep 1
  done
done
"""


def _arm64_root() -> Path:
    r = subprocess.run([str(REPO / "scripts" / "arm64_root.sh")], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.skip(f"no arm64 root (scripts/arm64_root.sh failed): {r.stderr[-800:]}")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="chroot into the arm64 root needs root")
def test_arm64_device_completes_a_round_against_an_x86_server(tmp_path) -> None:
    root = _arm64_root()
    uname = subprocess.run(["chroot", str(root), "uname", "-m"], capture_output=True, text=True).stdout.strip()
    assert uname == "aarch64"
    ws = tmp_path / "fleet"
    ws.mkdir()
    (ws / "manifest.in").write_text(MANIFEST)
    env = {**os.environ, "REPO": str(REPO), "WS": str(ws), "R": str(root), "TLS_PORT": str(free_port()),
           "PLAIN_PORT": str(free_port()), "HTTP_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    out = run_script_in_group(["bash", "-c", SCRIPT], env, 3000, "arm64 round", lambda: _logs(ws))
    assert set(re.findall(r"^(\d+)\s+completed\s", out, re.M)) == {"0", "1"}, out[-3000:]
    # both arm64 devices' results were accepted (rounds wait for min_devices: flashing under
    # emulation takes minutes)
    with sqlite3.connect(ws / "registry.db") as db:
        accepted = {d for (d,) in db.execute("select device_id from assignments where status = 'accepted'")}
    assert accepted == set(DEVICES), accepted
    for dev in DEVICES:
        base = root / "srv" / "koala" / dev
        cfg = json.loads((base / "etc/koala/device.json").read_text())
        # the device venv's interpreter is an aarch64 process
        py = f"/srv/koala/{dev}/opt/koala/venv/bin/python"
        machine = subprocess.run(["chroot", str(root), py, "-c", "import platform; print(platform.machine())"],
                                 capture_output=True, text=True).stdout.strip()  # fmt: skip
        assert machine == "aarch64", machine
        # every on-device phase ran: the int8 inference model was re-quantized on the device
        state = root / cfg["state_dir"].lstrip("/")
        int8 = state / "model_int8.tflite"
        assert int8.stat().st_size > 1000 and int8.stat().st_mtime > (ws / "rounds.done").stat().st_mtime
        log = (ws / f"{dev}.log").read_text()
        assert "Traceback" not in log, log[-3000:]


def _logs(ws: Path) -> str:
    parts = []
    for log in [ws / "server.log", ws / "broker" / "mosquitto.log", *sorted(ws.glob("arm-*.log"))]:
        if log.exists():
            parts.append(f"--- {log.name}\n{log.read_text()[-2500:]}")
    return "\n".join(parts)


def test_arm64_root_script_is_documented() -> None:
    """The script this test and docs/arm64.md use exists, registers qemu-aarch64, and is the documented way."""
    script = (REPO / "scripts" / "arm64_root.sh").read_text()
    assert "debootstrap" in script and "qemu-aarch64" in script
    assert "scripts/arm64_root.sh" in (REPO / "docs" / "arm64.md").read_text()
