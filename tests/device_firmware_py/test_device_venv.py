"""A device install (`pip install .[device]` into a fresh venv) trains, infers and quantizes.

This is the dependency rule made real: the wheel is installed with only the `device` extra, the
script runs outside the repo (so it imports the installed package, not the checkout), and
afterwards neither torch, tensorflow nor server_app may be in sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
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
    int8 = TFLiteLogits(m.quantize_int8(x))(x)
    print(json.dumps({
        "package": device_firmware_py.__file__,
        "loss": loss, "kd": kd, "logits_shape": list(logits.shape), "int8_shape": list(int8.shape),
        "forbidden": sorted(m for m in ("torch", "tensorflow", "server_app") if m in sys.modules),
        "tf_like": sorted(m for m in sys.modules if m.startswith(("tensorflow", "torch", "server_app"))),
    }))
    """
)


@pytest.fixture(scope="session")
def device_venv(tmp_path_factory) -> Path:
    """A fresh venv with `koala-edge[device]` installed from this checkout (cached per session)."""
    root = tmp_path_factory.mktemp("device_venv")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    res = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", f"{REPO}[device]"],
        capture_output=True, text=True, timeout=900, cwd=root,
    )  # fmt: skip
    if res.returncode != 0:
        pytest.fail(f"pip install .[device] failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return py


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


def test_device_install_has_no_torch_or_tensorflow_distribution(device_venv):
    """The device extra pulls in neither framework (ai-edge-quantizer included)."""
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
