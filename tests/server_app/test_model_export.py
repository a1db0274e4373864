"""The portable model export (server_app/models/export.py, card.py) and the API that serves it.

Real torch, real ONNX Runtime, real LiteRT; no mocks. The models are briefly trained on
Fashion-MNIST when /usr/share/datasets/fashion-mnist exists, else on digits, so that argmax
agreement is measured on logits that are not near ties.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from api_fixtures import TOKEN, RegistryServices
from export_fixtures import compare, context, eval_data, register, server_models_dir, trained_state
from fastapi.testclient import TestClient

from server_app.models import export as mx
from server_app.models.card import CARD_FORMAT, CLASS_NAMES, CardError, read_card

N_EQ = 1000  # test images the formats are compared on
# torch 2.13 marks torch.jit.* deprecated; TorchScript is still one of the formats users asked for
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def data():
    return eval_data()


@pytest.fixture(scope="module")
def state(data):
    torch.set_num_threads(1)
    return trained_state(data)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, data, state):
    """A server's models/ with versions 1 and 2 (checkpoints + exports), all formats built."""
    md = server_models_dir(tmp_path_factory.mktemp("export"), state, context(data), versions=(1, 2))
    for v in (1, 2):
        mx.prebuild(mx.export_dir(md, v))
    return md


@pytest.fixture(scope="module")
def edir(models_dir):
    return mx.export_dir(models_dir, 2)


@pytest.fixture(scope="module")
def torch_logits(data, state):
    with torch.no_grad():
        return state["_model"](torch.from_numpy(data.x_test[:N_EQ])).numpy()


# ----------------------------------------------------------------------------------- card + weights
def test_card_says_how_to_rebuild_and_use_the_model(edir, data):
    card = read_card(edir)
    assert card["format"] == CARD_FORMAT and card["version"] == 2 and card["round"] == 1
    m = card["model"]
    assert m["factory"] == "server_app.models.large:build_large" and m["options"] == {"width": 16}
    assert m["class"] == "server_app.models.large.LargeCNN" and m["param_count"] > 100_000
    conv0 = m["layers"][0]
    assert conv0 == {"name": "features.0", "type": "Conv2d", "in_channels": data.shape[2], "out_channels": 16,
                     "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
                     "bias": True}  # fmt: skip
    assert m["layers"][-1]["type"] == "Linear" and m["layers"][-1]["out_features"] == 10
    assert m["tensors"]["features.0.weight"] == {"shape": [16, data.shape[2], 3, 3], "dtype": "float32"}
    i, o = card["input"], card["output"]
    assert i["shape"] == list(data.shape) and i["layout"] == "NHWC" and i["dtype"] == "float32"
    assert i["normalisation"]["formula"] == ("x = pixel / 255" if data.name == "fashion-mnist" else "x = pixel / 16")
    assert o["classes"] == CLASS_NAMES[data.name]
    assert card["policy"]["strategy"] == "koala_homo" and card["data"]["dataset"] == data.name
    assert len(card["data"]["calibration_sha256"]) == 64
    # the history is carried from version to version
    assert [(h["version"], h["round"]) for h in card["accuracy_per_round"]] == [(1, 0), (2, 1)]
    assert card["accuracy_per_round"][1]["large_test_acc"] == pytest.approx(0.6)
    st = edir / "model.safetensors"
    assert card["files"]["model.safetensors"]["sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    assert card["small"]["cnn_small"]["artifact"] == f"cnn_small_{'x'.join(map(str, data.shape))}"


def test_safetensors_and_weights_only_pt_load_without_pickle(edir, state):
    from safetensors import safe_open
    from safetensors.torch import load_file

    sd = load_file(str(edir / "model.safetensors"))
    assert sd.keys() == state["large"].keys()
    assert all(torch.equal(sd[k], state["large"][k]) for k in sd)
    with safe_open(str(edir / "model.safetensors"), "pt") as f:
        assert f.metadata()["koala_model_version"] == "2"
    pt = torch.load(edir / "model.pt", weights_only=True)  # no code runs: plain tensors only
    assert all(torch.equal(pt[k], state["large"][k]) for k in sd)
    # the card + safetensors rebuild the module (no checkpoint pickle involved)
    model = mx.load_large(edir)
    assert all(torch.equal(v, state["large"][k]) for k, v in model.state_dict().items())


def test_onnx_and_torchscript_equal_pytorch_on_1000_test_images(edir, data, torch_logits):
    """ONNX Runtime and TorchScript against the PyTorch module on 1,000 test images: the same float32
    graph, so differences are summation-order rounding (measured ~1e-6 on logits of magnitude ~10)."""
    import onnxruntime as ort

    x = data.x_test[:N_EQ]
    sess = ort.InferenceSession(str(edir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"] and sess.get_inputs()[0].shape[1:] == list(data.shape)
    onnx_logits = sess.run(["logits"], {"x": x})[0]
    ts = torch.jit.load(str(edir / "model.torchscript.pt"))
    with torch.no_grad():
        ts_logits = ts(torch.from_numpy(x)).numpy()
    scale = float(np.abs(torch_logits).max())
    for name, got in (("onnx", onnx_logits), ("torchscript", ts_logits)):
        c = compare(torch_logits, got)
        print(f"{name}: n={c['n']} max_abs_diff={c['max_abs_diff']:.3g} (logits up to {scale:.3g}) "
              f"argmax_agreement={c['argmax_agreement']:.4f}")  # fmt: skip
        assert c["n"] == N_EQ
        assert c["max_abs_diff"] <= 1e-4 * max(1.0, scale), c
        assert c["argmax_agreement"] >= 0.999, c  # at most one exact tie may flip
    # dynamic batch: one image gives the same row
    one = sess.run(["logits"], {"x": x[:1]})[0]
    assert np.allclose(one, onnx_logits[:1], atol=1e-5)
    # the metadata travels inside the ONNX file
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["koala_model_version"] == "2" and meta["input_layout"] == "NHWC"


def test_small_models_run_in_litert(edir, data, state):
    """The float .tflite gives the small model's own logits; int8 keeps its decisions."""
    from ai_edge_litert.interpreter import Interpreter

    from device_firmware_py.runtime.quantize import TFLiteLogits
    from device_firmware_py.runtime.small_model import SmallModel

    ref = SmallModel(read_card(edir)["small"]["cnn_small"]["artifact"], num_threads=1)
    ref.set_weights(state["small"]["cnn_small"])
    x = data.x_test[:N_EQ]
    want = ref.logits(x)
    flt = mx.ensure_small(edir, "cnn_small", "float")
    interp = Interpreter(model_path=str(flt))  # the plain LiteRT API of docs/models.md
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [8, *data.shape])
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x[:8])
    interp.invoke()
    assert np.allclose(interp.get_tensor(out["index"]), want[:8], atol=1e-4)
    c_float = compare(want, TFLiteLogits(flt, num_threads=1)(x))
    c_int8 = compare(want, TFLiteLogits(mx.ensure_small(edir, "cnn_small", "int8"), num_threads=1)(x))
    print(f"small float: {c_float}  int8: {c_int8}")
    assert c_float["max_abs_diff"] < 1e-4 and c_float["argmax_agreement"] == 1.0
    assert c_int8["argmax_agreement"] >= 0.9, c_int8


def test_bad_requests_say_why(models_dir, edir, tmp_path):
    with pytest.raises(mx.ExportError, match="unknown model version 7"):
        mx.pick_version(models_dir, 7)
    with pytest.raises(mx.ExportError, match="not a number"):
        mx.pick_version(models_dir, "newest")
    assert mx.pick_version(models_dir, "latest") == 2
    with pytest.raises(mx.ExportError, match="unknown format 'tflite'"):
        mx.ensure_format(edir, "tflite")
    with pytest.raises(mx.ExportError, match="no global small model 'mlp_tiny'; architectures: cnn_small"):
        mx.ensure_small(edir, "mlp_tiny", "float")
    with pytest.raises(mx.ExportError, match="does not exist"):
        mx.resolve_models_dir(tmp_path / "nope")
    with pytest.raises(mx.ExportError, match="holds no models"):
        mx.resolve_models_dir(tmp_path)
    with pytest.raises(CardError, match="no model card"):
        read_card(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CardError, match="not a KOALA model card"):
        read_card(tmp_path)
    assert mx.resolve_models_dir(models_dir.parent) == models_dir


def test_exporter_writes_each_version_once_and_builds_the_rest_in_background(tmp_path, data, state):
    ex = mx.ModelExporter(tmp_path, context(data))
    ckpt = {k: v for k, v in state.items() if not k.startswith("_")}
    out = ex.publish(3, 2, {"large_test_acc": 0.7}, ckpt)
    assert out is not None and (out / "model.json").is_file() and (out / "small" / "cnn_small.float.tflite").is_file()
    assert ex.wait_idle(120)
    assert mx.present_formats(out) == list(mx.LARGE_FORMATS)
    assert (out / "small" / "cnn_small.int8.tflite").is_file()
    stamp = (out / "model.json").stat().st_mtime_ns
    assert ex.publish(3, 2, {}, ckpt) == out and (out / "model.json").stat().st_mtime_ns == stamp  # restart: kept
    # the same version number with other weights (a data dir reused by a fresh registry): rewritten
    other = {**ckpt, "large": {k: v + 1 for k, v in ckpt["large"].items()}}
    ex.publish(3, 0, {}, other)
    assert ex.wait_idle(120)
    assert read_card(out)["round"] == 0
    # a failing export is logged, never raised into the round loop
    assert ex.publish(4, 3, {}, {"small": {}}) is None


def test_without_global_small_weights_the_server_distils_a_student(tmp_path, data, state):
    """Devices upload logits (teacher = device_logits, the default): the export's small model is the
    large model distilled into the artifact on the proxy set, continued version after version."""
    from device_firmware_py.runtime.quantize import TFLiteLogits

    ctx = context(data)
    ctx.proxy_x = data.x_train[-1000:]
    ckpt = {"large": state["large"], "small": {}}
    ex = mx.ModelExporter(tmp_path, ctx, prebuild=False)
    e1, e2 = ex.publish(1, 0, {}, ckpt), ex.publish(2, 1, {}, ckpt)
    s1, s2 = read_card(e1)["small"]["cnn_small"], read_card(e2)["small"]["cnn_small"]
    assert s1["source"] == "server_kd" and s1["kd"]["from_version"] is None and s2["kd"]["from_version"] == 1
    x = data.x_test[:N_EQ]
    with torch.no_grad():
        large = state["_model"](torch.from_numpy(x)).numpy()
    agree = [compare(large, TFLiteLogits(mx.ensure_small(e, "cnn_small", "float"), num_threads=1)(x))["argmax_agreement"]
             for e in (e1, e2)]  # fmt: skip
    print(f"server-distilled cnn_small agrees with the large model on {agree} of {N_EQ} test images (v1, v2)")
    assert agree[1] >= 0.5 and agree[1] >= agree[0] - 0.05


# ------------------------------------------------------------------------------------------ the API
@pytest.fixture(scope="module")
def api(tmp_path_factory, models_dir):
    from server_app.api.app import create_app
    from server_app.api.auth import AuthConfig
    from server_app.registry import Registry

    d = tmp_path_factory.mktemp("export-api")
    reg = Registry(f"sqlite:///{d / 'koala.db'}")
    reg.upgrade()
    register(reg, models_dir, versions=(1, 2))
    app = create_app(RegistryServices(reg))
    app.state.auth = AuthConfig(token=TOKEN, open_reads_localhost=False)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c
    reg.dispose()


def test_api_download_is_the_portable_export(api, edir, data, torch_logits):
    import onnxruntime as ort

    items = api.get("/api/v1/models", params={"kind": "large"}).json()["items"]
    v2 = next(m for m in items if m["version"] == 2)
    assert set(v2["formats"]) == {"safetensors", "pt", "torchscript", "onnx", "card", "checkpoint"}
    r = api.get(v2["download"])
    assert r.status_code == 200 and r.content == (edir / "model.safetensors").read_bytes()
    assert r.headers["x-content-sha256"] == read_card(edir)["files"]["model.safetensors"]["sha256"]
    assert "large-v2-model.safetensors" in r.headers["content-disposition"]
    r = api.get(v2["formats"]["onnx"])
    assert r.status_code == 200 and r.headers["x-content-sha256"] == hashlib.sha256(r.content).hexdigest()
    sess = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    assert compare(torch_logits[:64], sess.run(None, {"x": data.x_test[:64]})[0])["argmax_agreement"] == 1.0
    card = api.get("/api/v1/models/large/large/2/card").json()
    assert card == read_card(edir)
    ck = api.get(v2["formats"]["checkpoint"])
    assert ck.status_code == 200 and ck.headers["x-content-sha256"] == v2["sha256"]


def test_api_small_models(api, data):
    from device_firmware_py.runtime.quantize import TFLiteLogits

    rows = api.get("/api/v1/models/small").json()
    assert [(r["arch"], r["version"]) for r in rows] == [("cnn_small", 2)]
    for fmt in ("float", "int8"):
        r = api.get(rows[0]["downloads"][fmt])
        assert r.status_code == 200 and r.headers["x-content-sha256"] == hashlib.sha256(r.content).hexdigest()
        logits = TFLiteLogits(r.content, num_threads=1)(data.x_test[:16])
        assert logits.shape == (16, 10)
    assert api.get("/api/v1/models/small", params={"version": 1}).json()[0]["version"] == 1


@pytest.mark.parametrize(("path", "params", "status", "detail"), [
    ("/api/v1/models/large/large/9/download", {}, 404, "not found"),
    ("/api/v1/models/large/large/2/download", {"format": "h5"}, 422, None),
    ("/api/v1/models/large/large/9/card", {}, 404, "not found"),
    ("/api/v1/models/small/mlp_tiny", {}, 404, "no global small model 'mlp_tiny'"),
    ("/api/v1/models/small/cnn_small", {"format": "int4"}, 422, None),
    ("/api/v1/models/small/cnn_small", {"version": 9}, 404, "not found"),
    ("/api/v1/models/small", {"version": 9}, 404, "not found"),
])  # fmt: skip
def test_api_bad_requests(api, path, params, status, detail):
    r = api.get(path, params=params)
    assert r.status_code == status and r.headers["content-type"].startswith("application/problem+json"), r.text
    if detail:
        assert detail in r.json()["detail"]


def test_api_version_without_export(api, models_dir):
    """A version an older server wrote (checkpoint only): a 404 that says how to build the export."""
    import shutil

    from server_app.registry import crud

    p = models_dir / "strategy_v00005.pt"
    shutil.copyfile(models_dir / "strategy_v00001.pt", p)
    reg = api.app.state.services.registry
    with reg.session() as s:
        crud.add_model_version(s, kind="large", arch="large", path=str(p), sha256="0" * 64, nbytes=1, version=5)
    try:
        r = api.get("/api/v1/models/large/large/5/download")
        assert r.status_code == 404 and "koala models export" in r.json()["detail"]
        assert api.get("/api/v1/models/large/large/5/card").status_code == 404
        assert api.get("/api/v1/models/small").status_code == 404  # the newest version has none
    finally:
        p.unlink()
