"""`koala models` against a server's data directory and over a real HTTP API (uvicorn + SQLite registry)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from api_fixtures import RegistryServices, served_app
from export_fixtures import context, eval_data, register, server_models_dir, trained_state

from server_app.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    torch.set_num_threads(1)
    data = eval_data()
    root = tmp_path_factory.mktemp("models-cli")
    server_models_dir(root, trained_state(data, n_train=320), context(data), versions=(1, 2))
    return root


@pytest.fixture(scope="module")
def api(data_dir, tmp_path_factory):
    from server_app.api.app import create_app
    from server_app.registry import Registry

    d = tmp_path_factory.mktemp("models-cli-api")
    reg = Registry(f"sqlite:///{d / 'koala.db'}")
    reg.upgrade()
    register(reg, data_dir / "models", versions=(1, 2))
    with served_app(create_app(RegistryServices(reg)), d) as (url, token):
        yield ["--api", url, "--token-file", str(token)]
    reg.dispose()


def _koala(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_data_dir_ls_show_export_small(data_dir, tmp_path, capsys):
    rc, out, _ = _koala(capsys, "models", "ls", "--data-dir", str(data_dir))
    assert rc == 0 and out.splitlines()[0].split() == ["version", "round", "large_test_acc", "formats", "small"]
    assert [ln.split()[0] for ln in out.splitlines()[1:]] == ["1", "2"]
    rc, out, _ = _koala(capsys, "models", "show", "--data-dir", str(data_dir))
    assert rc == 0 and out.startswith("version      2 (round 1") and "x = pixel /" in out
    rc, out, _ = _koala(capsys, "models", "show", "1", "--data-dir", str(data_dir / "models"), "--json")
    assert rc == 0 and json.loads(out)["version"] == 1
    rc, out, _ = _koala(capsys, "models", "export", "--data-dir", str(data_dir), "--format", "onnx", "--out", str(tmp_path / "m"))
    assert rc == 0 and sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.onnx", "model.safetensors"]
    rc, out, _ = _koala(capsys, "models", "small", "--data-dir", str(data_dir), "--format", "all", "--out", str(tmp_path / "s"))
    assert rc == 0 and sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cnn_small.float.tflite", "cnn_small.int8.tflite"]


@pytest.mark.parametrize(("argv", "expect"), [
    (["models", "ls", "--data-dir", "/nonexistent/koala"], "does not exist"),
    (["models", "show", "7", "--data-dir", "{d}"], "unknown model version 7"),
    (["models", "export", "x1", "--data-dir", "{d}"], "not a number or 'latest'"),
    (["models", "small", "mlp_tiny", "--data-dir", "{d}"], "has no small model mlp_tiny; it has: cnn_small"),
])  # fmt: skip
def test_data_dir_errors_are_one_line(data_dir, capsys, argv, expect):
    rc, _, err = _koala(capsys, *[a.replace("{d}", str(data_dir)) for a in argv])
    assert rc == 1 and expect in err and len(err.strip().splitlines()) <= 2 and "Traceback" not in err, err


def test_over_the_api(api, data_dir, tmp_path, capsys):
    import onnxruntime as ort

    rc, out, _ = _koala(capsys, "models", "ls", *api)
    assert rc == 0 and [ln.split()[0] for ln in out.splitlines()[1:]] == ["1", "2"]
    rc, out, _ = _koala(capsys, "models", "show", "latest", "--json", *api)
    assert rc == 0 and json.loads(out)["version"] == 2
    out_dir = tmp_path / "m"
    rc, out, _ = _koala(capsys, "models", "export", "2", "--format", "all", "--out", str(out_dir), *api)
    assert rc == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.json", "model.onnx", "model.pt", "model.safetensors",
                                                          "model.torchscript.pt"]  # fmt: skip
    src = data_dir / "models" / "export" / "v00002" / "model.safetensors"
    assert hashlib.sha256((out_dir / "model.safetensors").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    card = json.loads((out_dir / "model.json").read_text())
    x = np.zeros((2, *card["input"]["shape"]), np.float32)
    assert ort.InferenceSession(str(out_dir / "model.onnx")).run(None, {"x": x})[0].shape == (2, 10)
    rc, out, _ = _koala(capsys, "models", "small", "cnn_small", "--format", "int8", "--out", str(tmp_path / "s"), *api)
    assert rc == 0 and (tmp_path / "s" / "cnn_small.int8.tflite").stat().st_size > 1000
    rc, _, err = _koala(capsys, "models", "export", "9", *api)
    assert rc == 1 and "unknown model version '9'; the server has: 1, 2" in err
    rc, _, err = _koala(capsys, "models", "ls", "--api", api[1], "--token-file", str(tmp_path / "nope"))
    assert rc == 1 and "cannot read the token file" in err
