"""A flashed bundle, installed offline from its own wheels, joins a round on the hardened broker.

The whole field path, with real parts only: `koala provision add` + `bundle` (registry, $7$ hash,
CA, agent wheel + device-extra wheels) -> `flash.sh --target-root ROOT --install-venv` (a fresh
venv from `--no-index --find-links` the bundle, with pip's own config disabled so no other
wheel source can help) -> `ROOT/opt/koala/venv/bin/koala-device run --config ROOT/etc/koala/
device.json` over TLS with its bundle credentials -> the test, as the `koala-server` account,
sends a contract-encoded assignment and receives the device's result. The flashed systemd unit
passes `systemd-analyze verify`, and the same bundle is flashed over SSH (`flash.sh --host`, a
private sshd on a loopback port, into a staging `--remote-root`) where sshd is installed.
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from server_app.cli import main as koala
from server_app.provisioning.accounts import read_secret
from server_app.provisioning.local_broker import find_mosquitto, free_port, wait_listening

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]
DEV = "pi-flash"
WAIT_S = 240


def _server_client(port: int, secret: str, inbox: queue.Queue) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="koala-server-test")
    c.username_pw_set("koala-server", secret)
    c.on_message = lambda _c, _u, m: inbox.put((m.topic, m.payload))
    c.connect("127.0.0.1", port)
    c.loop_start()
    for f in (topics.device_status(DEV), topics.device_result(DEV)):
        c.subscribe(f, qos=1)
    return c


def test_flashed_bundle_installs_offline_and_submits_a_round(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    broker, root, out = tmp_path / "broker", tmp_path / "root", tmp_path / "out"
    tls_port, plain_port = free_port(), free_port()
    rng = np.random.default_rng(0)
    data, proxy = tmp_path / "data.npz", tmp_path / "proxy.npz"
    np.savez(data, x=rng.uniform(size=(96, 8, 8, 1)).astype(np.float32), y=rng.integers(0, 10, 96))
    np.savez(proxy, x=rng.uniform(size=(40, 8, 8, 1)).astype(np.float32))

    assert koala(["provision", "--db", db, "add", DEV, "--arch", "cnn_small"]) == 0
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
    mosq = subprocess.Popen(
        [find_mosquitto(), "-c", str(broker / "mosquitto.conf")], stderr=subprocess.DEVNULL
    )
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(str(mosq.pid))
    agent = None
    try:
        wait_listening(tls_port, proc=mosq)
        assert (
            koala(
                [
                    "provision",
                    "--db",
                    db,
                    "bundle",
                    DEV,
                    "--out",
                    str(out),
                    "--broker-dir",
                    str(broker),
                    "--pid-file",
                    str(pid_file),
                    "--broker-url",
                    f"mqtts://127.0.0.1:{tls_port}",
                    "--data",
                    str(data),
                    "--proxy",
                    str(proxy),
                ]
            )
            == 0
        )
        bundle = out / f"koala-bundle-{DEV}"
        assert (out / f"koala-bundle-{DEV}.tar.gz").is_file()
        assert (bundle / "etc/koala/device.secret").stat().st_mode & 0o077 == 0
        wheels = sorted(w.name for w in (bundle / "opt/koala/wheels").glob("*.whl"))
        assert any(w.startswith("koala_edge_device-") for w in wheels), wheels
        assert not any(w.startswith(("koala_edge-", "scipy-", "torch-")) for w in wheels), wheels
        assert "@ROOT@/etc/koala/device.secret" in (bundle / "etc/koala/device.json").read_text()

        assert not root.exists()  # flash.sh creates its target
        env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PYTHON=sys.executable)
        env.pop("PIP_FIND_LINKS", None)
        flash = subprocess.run(
            ["bash", str(bundle / "flash.sh"), "--target-root", str(root), "--in-place", "--install-venv"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert flash.returncode == 0, flash.stdout[-2000:] + flash.stderr[-4000:]
        for p in (
            "opt/koala/venv/bin/koala-device",
            "etc/koala/device.json",
            "etc/koala/ca.crt",
            "etc/systemd/system/koala-device.service",
            "var/lib/koala/data.npz",
        ):
            assert (root / p).exists(), p
        cfg = json.loads((root / "etc/koala/device.json").read_text())
        assert cfg["password_file"] == f"{root}/etc/koala/device.secret"  # paths fixed at install
        site = next((root / "opt/koala/venv/lib").glob("python3*/site-packages"))
        assert not (site / "server_app").exists() and not (site / "scipy").exists()
        assert not (site / "pip").exists()
        _systemd_verifies(root, tmp_path)
        if Path("/usr/sbin/sshd").exists() and os.geteuid() == 0:
            _flash_over_ssh(bundle, tmp_path)
        else:
            warnings.warn("flash.sh --host not exercised: no /usr/sbin/sshd or not root", stacklevel=1)

        inbox: queue.Queue = queue.Queue()
        srv = _server_client(plain_port, read_secret(broker, "koala-server"), inbox)
        agent = subprocess.Popen(
            [
                str(root / "opt/koala/venv/bin/koala-device"),
                "run",
                "--config",
                str(root / "etc/koala/device.json"),
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        while True:
            topic, payload = inbox.get(timeout=WAIT_S)
            if topic == topics.device_status(DEV) and codec.decode_control(payload).state == "online":
                break
        teacher = rng.normal(size=(40, 10)).astype(np.float32)
        assignment = cm.Assignment(
            round_id=1,
            device_id=DEV,
            arch="cnn_small",
            plan=cm.TrainingPlan(task="koala", local_epochs=1, fkd_epochs=1, batch=32, upload=("logits",)),
            teacher_logits=teacher,
        )
        srv.publish(topics.device_assign(DEV), codec.encode(assignment), qos=1).wait_for_publish(10)
        while True:
            topic, payload = inbox.get(timeout=WAIT_S)
            if topic == topics.device_result(DEV):
                result = codec.decode(payload, cm.Result)
                break
        assert result.round_id == 1 and result.device_id == DEV and result.num_samples == 96
        assert result.proxy_logits is not None and result.proxy_logits.shape == (40, 10)
        assert np.isfinite(result.proxy_logits).all()
        srv.loop_stop()
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
        mosq.terminate()
        mosq.wait(10)


def _systemd_verifies(root: Path, tmp_path: Path) -> None:
    """The flashed unit passes `systemd-analyze verify` (directives, sections, executables). The
    bundle was flashed `--in-place`, so its paths point into the flashed root."""
    if shutil.which("systemd-analyze") is None:
        warnings.warn("systemd-analyze not installed: unit not verified", stacklevel=1)
        return
    check = tmp_path / "verify" / "koala-device.service"  # a copy: verify reads the unit name from the path
    check.parent.mkdir()
    check.write_text((root / "etc/systemd/system/koala-device.service").read_text())
    out = subprocess.run(["systemd-analyze", "verify", str(check)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Unknown" not in out.stderr, out.stdout + out.stderr


def _flash_over_ssh(bundle: Path, tmp_path: Path) -> None:
    """`flash.sh --host` against a private sshd on a loopback port (key auth, throw-away host key),
    installing into a staging root on the "device": files land, the offline venv runs the agent."""
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_listening(port, proc=sshd)
        remote = tmp_path / "device-root"
        remote.mkdir()
        opts = (f"-o Port={port} -i {d / 'client'} -o BatchMode=yes -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")  # fmt: skip
        t0 = time.monotonic()
        flash = subprocess.run(["bash", str(bundle / "flash.sh"), "--host", f"{getpass.getuser()}@127.0.0.1",
                                "--ssh-opt", opts, "--remote-root", str(remote)],
                               capture_output=True, text=True, timeout=600)  # fmt: skip
        assert flash.returncode == 0, flash.stdout[-2000:] + flash.stderr[-4000:]
        for p in ("opt/koala/venv/bin/koala-device", "etc/koala/device.json", "etc/koala/device.secret",
                  "etc/systemd/system/koala-device.service"):  # fmt: skip
            assert (remote / p).exists(), p
        assert (remote / "etc/koala/device.secret").stat().st_mode & 0o077 == 0
        info = subprocess.run([str(remote / "opt/koala/venv/bin/koala-device"), "info"], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert info.returncode == 0 and "cnn_small" in info.stdout, info.stdout[-2000:] + info.stderr[-2000:]
        assert not Path(f"/tmp/koala-bundle-{DEV}").exists(), "the remote copy of the bundle is cleaned up"
        print(f"flash over ssh: {time.monotonic() - t0:.1f} s")
    finally:
        sshd.terminate()
        sshd.wait(10)


def test_target_platform_tags_cover_older_glibc() -> None:
    from server_app.provisioning.wheels import Target

    tags = Target("manylinux_2_36_aarch64", "3.11").platform_tags()
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_27_aarch64" in tags
    assert tags[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert Target("manylinux2014_aarch64").platform_tags() == ["manylinux2014_aarch64"]
    assert Target().pip_args() == []


def test_arm64_wheelhouse_for_a_raspberry_pi(tmp_path) -> None:
    """The wheels a Raspberry Pi (arm64, glibc 2.36, Python 3.11) installs: all aarch64 or pure,
    LiteRT included, scipy left out, the device-only agent wheel."""
    from server_app.provisioning.wheels import Target, build_device_wheelhouse

    lock = build_device_wheelhouse(tmp_path, Target("manylinux_2_36_aarch64", "3.11"))
    wheels = sorted(w.name for w in tmp_path.glob("*.whl"))
    binary = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert binary and all("aarch64" in w for w in binary), binary
    assert any(w.startswith("ai_edge_litert-") for w in wheels) and any(w.startswith("numpy-") for w in wheels)
    assert not any(w.startswith(("scipy-", "litert_lm_builder-", "koala_edge-")) for w in wheels), wheels
    assert any(w.startswith("koala_edge_device-") for w in wheels)
    assert "ai-edge-litert==" in lock.read_text() and "scipy" not in lock.read_text()
