"""A device install, made exactly as a bundle makes it, trains, infers and quantizes.

This is the dependency rule made real: the device wheelhouse (the device-only agent wheel + the
slimmed dependency wheels + requirements.lock, server_app.provisioning.wheels) is installed by the
bundle's own `install-venv.sh` into a staging root, offline; the script runs outside the repo (so
it imports the installed package, not the checkout), and afterwards neither torch, tensorflow nor
server_app may be in sys.modules, nor scipy be installed. The int8 model it makes is byte-identical
to the one the server's environment (with scipy) makes, and the install stays within its budget.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_BUDGET_MIB = 100  # issue 16: a Raspberry-Pi-class device install

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import numpy as np
    import device_firmware_py
    from device_firmware_py.runtime.small_model import SmallModel
    from device_firmware_py.runtime.quantize import TFLiteLogits

    m = SmallModel("cnn_small_8x8x1")
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(64, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    loss = m.train(x, y, steps=5)
    kd = m.distill(x, rng.normal(size=(64, 10)), temperature=2.0, steps=2)
    logits = m.logits(x)
    int8_model = m.quantize_int8(x)
    int8 = TFLiteLogits(int8_model)(x)
    print(json.dumps({
        "package": device_firmware_py.__file__,
        "loss": loss, "kd": kd, "logits_shape": list(logits.shape), "int8_shape": list(int8.shape),
        "int8_sha256": hashlib.sha256(int8_model).hexdigest(),
        "forbidden": sorted(m for m in ("torch", "tensorflow", "server_app") if m in sys.modules),
        "tf_like": sorted(m for m in sys.modules if m.startswith(("tensorflow", "torch", "server_app"))),
    }))
    """
)


@pytest.fixture(scope="session")
def device_venv(tmp_path_factory) -> Path:
    """The bundle's wheelhouse installed by the bundle's install-venv.sh, offline (cached per session)."""
    from server_app.provisioning.bundle import TEMPLATES
    from server_app.provisioning.wheels import build_device_wheelhouse

    root = tmp_path_factory.mktemp("device_root")
    opt = root / "opt" / "koala"
    build_device_wheelhouse(opt / "wheels")
    (opt / "BUNDLE_ID").write_text("test\n")
    shutil.copy(TEMPLATES / "install-venv.sh", opt / "install-venv.sh")
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PYTHON=sys.executable)
    env.pop("PIP_FIND_LINKS", None)
    res = subprocess.run(["sh", str(opt / "install-venv.sh"), str(root)], capture_output=True, text=True,
                         timeout=900, env=env)  # fmt: skip
    if res.returncode != 0:
        pytest.fail(f"install-venv.sh failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return opt / "venv" / "bin" / "python"


def test_device_install_trains_without_torch_tensorflow_or_server(device_venv, tmp_path):
    res = subprocess.run(
        [str(device_venv), "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert not out["package"].startswith(str(REPO)), "must import the installed wheel, not the checkout"
    assert out["forbidden"] == [] and out["tf_like"] == []
    assert out["logits_shape"] == [64, 10] and out["int8_shape"] == [64, 10]
    assert out["loss"] == out["loss"] and out["kd"] == out["kd"]  # not NaN
    # the same script in the checkout's (server) environment, where scipy is installed: same int8 bytes
    ref = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ref.returncode == 0, ref.stderr[-4000:]
    assert json.loads(ref.stdout.strip().splitlines()[-1])["int8_sha256"] == out["int8_sha256"]


def test_device_install_is_small_and_holds_only_the_device(device_venv):
    """No server code, no scipy, no pip; within the install budget (after a round's byte code)."""
    venv_dir = Path(device_venv).parents[1]
    site = next((venv_dir / "lib").glob("python3*/site-packages"))
    present = {p.name for p in site.iterdir()}
    assert not present & {"server_app", "scipy", "torch", "tensorflow", "pip", "setuptools"}, present
    assert "device_firmware_py" in present
    from device_firmware_py.slim_install import tree_bytes

    size = tree_bytes(venv_dir) / 2**20
    assert size <= INSTALL_BUDGET_MIB, f"device install is {size:.1f} MiB, budget {INSTALL_BUDGET_MIB}"


def test_device_install_has_no_torch_or_tensorflow_distribution(device_venv):
    """The device install holds neither framework (ai-edge-quantizer included)."""
    code = "import importlib.util, json; print(json.dumps([m for m in ('torch', 'tensorflow') if importlib.util.find_spec(m)]))"
    res = subprocess.run([str(device_venv), "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(res.stdout) == []


def test_koala_device_info_in_device_install(device_venv):
    exe = Path(device_venv).parent / "koala-device"
    res = subprocess.run([str(exe), "info", "--arch", "cnn_small", "--input", "28x28x1"],
                         capture_output=True, text=True, timeout=120, cwd="/")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    assert [a["name"] for a in info["artifacts"]] == ["cnn_small_28x28x1"]


def test_koala_device_check_in_device_install(device_venv, tmp_path):
    """`koala-device check` (issue 29) is part of the device install and needs nothing of the server:
    a config whose CA file is missing is one FAIL line naming it, exit 1."""
    exe = Path(device_venv).parent / "koala-device"
    cfg = tmp_path / "device.json"
    cfg.write_text(json.dumps({"device_id": "pi-01", "data_path": str(tmp_path / "d.npz"), "proxy_path": str(tmp_path / "p.npy"),
                               "state_dir": str(tmp_path / "s"), "broker_url": "mqtts://127.0.0.1:1",
                               "ca_file": str(tmp_path / "ca.crt")}))  # fmt: skip
    res = subprocess.run([str(exe), "check", "--config", str(cfg)], capture_output=True, text=True, timeout=120, cwd="/")
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    assert f"FAIL  ca_file     CA file {tmp_path / 'ca.crt'} not found (ca_file in {cfg})" in res.stdout, res.stdout
    assert "Traceback" not in res.stderr
