"""The server's large model at work: POST /api/v1/predict (auth, bad input, answers = the model), the
cascade's MQTT path (a device's predict request answered on its own down/predict; over its predict
budget dropped), and a device agent with the cascade on / off through a real private Mosquitto and
the real ServerServices.

The large model is a briefly trained one (export_fixtures.trained_state) exported as the server does
and registered in a real SQLite registry; the predictor finds it through the registry.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from api_fixtures import TOKEN, RegistryServices
from export_fixtures import context, eval_data, register, server_models_dir, trained_state
from fastapi.testclient import TestClient

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from server_app.models import export as mx

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def data():
    return eval_data()


@pytest.fixture(scope="module")
def served(tmp_path_factory, data):
    """(registry, models_dir, reference logits of the exported version 2 on the first 64 test images)."""
    from server_app.registry import Registry

    torch.set_num_threads(1)
    state = trained_state(data, n_train=640)
    root = tmp_path_factory.mktemp("predict")
    md = server_models_dir(root, state, context(data), versions=(1, 2))
    reg = Registry(f"sqlite:///{root / 'koala.db'}")
    reg.upgrade()
    register(reg, md, versions=(1, 2))
    with torch.no_grad():
        ref = mx.load_large(mx.export_dir(md, 2))(torch.from_numpy(data.x_test[:64])).numpy()
    yield reg, md, ref
    reg.dispose()


@pytest.fixture(scope="module")
def api(served):
    from server_app.api.app import create_app
    from server_app.api.auth import AuthConfig

    app = create_app(RegistryServices(served[0]))
    app.state.auth = AuthConfig(token=TOKEN, open_reads_localhost=True)
    with TestClient(app) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_predict_needs_the_token_even_from_localhost(api, data):
    x = data.x_test[:2].tolist()
    r = api.post("/api/v1/predict", json=x)  # open_reads_localhost does not open predictions
    assert r.status_code == 401 and "bearer" in r.json()["detail"]
    r = api.post("/api/v1/predict", json=x, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_no_token_configured_is_403(served, data):
    from server_app.api.app import create_app
    from server_app.api.auth import AuthConfig

    app = create_app(RegistryServices(served[0]))
    app.state.auth = AuthConfig(token=None, open_reads_localhost=True)
    with TestClient(app) as c:
        r = c.post("/api/v1/predict", json=data.x_test[:1].tolist(), headers=AUTH)
    assert r.status_code == 403 and "token" in r.json()["detail"]


def test_answers_are_the_newest_exported_models(api, served, data):
    _reg, _md, ref = served
    want = ref.argmax(1)
    # a JSON list of inputs
    r = api.post("/api/v1/predict", json=data.x_test[:8].tolist(), headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_version"] == 2 and out["classes"] == want[:8].tolist()
    probs = np.asarray(out["probabilities"])
    assert probs.shape == (8, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-4)
    assert out["class_names"][0] == read_classes(served[1])[want[0]]
    # {"x": ...}, one [H, W] image of a 1-channel model, a raw .npy and a base64 .npy
    r = api.post("/api/v1/predict", json={"x": data.x_test[0, ..., 0].tolist()}, headers=AUTH)
    assert r.json()["classes"] == [int(want[0])]
    r = api.post("/api/v1/predict", content=_npy(data.x_test[:64]), headers={**AUTH, "Content-Type": "application/x-npy"})
    assert r.status_code == 200 and r.json()["classes"] == want.tolist()
    b64 = base64.b64encode(_npy(data.x_test[:4])).decode()
    assert api.post("/api/v1/predict", json={"npy_b64": b64}, headers=AUTH).json()["classes"] == want[:4].tolist()


def read_classes(md: Path) -> list[str]:
    return mx.read_card(mx.export_dir(md, 2))["output"]["classes"]


@pytest.mark.parametrize(
    "body,ctype,status,words",
    [
        (b"not json", "application/json", 400, "not JSON"),
        (json.dumps({"y": [1]}).encode(), "application/json", 400, "needs the inputs"),
        (json.dumps([[1, 2], [3]]).encode(), "application/json", 400, "rectangular"),
        (json.dumps([[0.5] * 10] * 2).encode(), "application/json", 400, "do not fit the model"),
        (_npy(np.zeros((2, 28, 28, 1), np.uint8)), "application/x-npy", 400, "scaled as in training"),
        (_npy(np.full((1, 28, 28, 1), np.nan, np.float32)), "application/x-npy", 400, "NaN"),
        (_npy(np.zeros((257, 28, 28, 1), np.float32)), "application/x-npy", 400, "at most 256"),
        (b"\x93NUMPY garbage", "application/x-npy", 400, "not a .npy"),
        (json.dumps({"npy_b64": "%%%"}).encode(), "application/json", 400, "not base64"),
        (b"0" * (4 << 20 | 1), "application/json", 413, "over"),
    ],
    ids=["not-json", "no-x", "ragged", "wrong-shape", "ints", "nan", "too-many", "bad-npy", "bad-b64", "too-big"],
)
def test_bad_input_is_a_clear_4xx(api, body, ctype, status, words):
    r = api.post("/api/v1/predict", content=body, headers={**AUTH, "Content-Type": ctype})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"], r.json()


def test_no_model_yet_is_503(tmp_path, data):
    from server_app.api.app import create_app
    from server_app.api.auth import AuthConfig
    from server_app.registry import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'empty.db'}")
    reg.upgrade()
    app = create_app(RegistryServices(reg))
    app.state.auth = AuthConfig(token=TOKEN)
    with TestClient(app) as c:
        r = c.post("/api/v1/predict", json=data.x_test[:1].tolist(), headers=AUTH)
    reg.dispose()
    assert r.status_code == 503 and "no large model yet" in r.json()["detail"]


def test_predictor_reloads_when_a_new_version_is_published(tmp_path, data):
    from server_app.models.predictor import LargePredictor, latest_export_in_dir

    state = trained_state(data, n_train=64)
    md = server_models_dir(tmp_path, state, context(data), versions=(1,))
    p = LargePredictor(latest_export_in_dir(md), recheck_s=3600)
    assert p.predict(data.x_test[:2]).version == 1
    server_models_dir(tmp_path, state, context(data), versions=(1, 3))  # version 3 published
    assert p.predict(data.x_test[:2]).version == 1  # not looked for yet (recheck_s)
    p.notify()
    assert p.predict(data.x_test[:2]).version == 3 and p.loads == 2


# ------------------------------------------------------------------------------- over MQTT
def _device_link(broker, device_id: str):
    from device_firmware_py.mqtt import MqttClient

    got: list[bytes] = []
    c = MqttClient(f"t-{device_id}-{secrets.token_hex(3)}", broker.host, broker.port, clean_session=True)
    c.subscribe(topics.device_predict_answer(device_id), 1, lambda t, p: got.append(bytes(p)))
    assert c.start(wait_s=10)
    return c, got


def _wait(pred, timeout_s: float) -> bool:
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_mqtt_requests_are_answered_on_the_devices_own_topic_within_budget(mosquitto_broker, served, data):
    from server_app.ingest_budget import Budgets, DeviceBudget
    from server_app.models.predictor import LargePredictor, latest_export_in_registry
    from server_app.predict_service import PredictService

    reg, _md, ref = served
    budget = DeviceBudget(Budgets(predict_per_s=0.01, predict_burst=3))
    svc = PredictService(LargePredictor(latest_export_in_registry(reg)), budget, host=mosquitto_broker.host,
                         port=mosquitto_broker.port).start()  # fmt: skip
    a, got_a = _device_link(mosquitto_broker, "dev-a")
    b, got_b = _device_link(mosquitto_broker, "dev-b")
    try:
        for i in range(6):  # 3 within the burst, 3 over budget
            req = cm.PredictRequest.from_array("dev-a", f"r{i}", data.x_test[i : i + 2], "float32")
            a.publish(topics.device_predict_request("dev-a"), codec.encode_control(req), 1)
        # a payload naming another device on dev-a's topic is refused (spoofed), not answered to anyone
        spoof = cm.PredictRequest.from_array("dev-b", "spoof", data.x_test[:1], "float32")
        a.publish(topics.device_predict_request("dev-a"), codec.encode_control(spoof), 1)
        # dev-b's budget is its own
        req = cm.PredictRequest.from_array("dev-b", "b0", data.x_test[10:11], "float16")
        b.publish(topics.device_predict_request("dev-b"), codec.encode_control(req), 1)
        assert _wait(lambda: len(got_a) >= 3 and len(got_b) >= 1, 20)
        time.sleep(0.5)
        answers = [codec.decode_control(p) for p in got_a]
        assert sorted(x.request_id for x in answers) == ["r0", "r1", "r2"]
        for x in answers:
            i = int(x.request_id[1:])
            assert x.status == "ok" and x.model_version == 2 and x.classes == ref[i : i + 2].argmax(1).tolist()
        (ans_b,) = [codec.decode_control(p) for p in got_b]
        assert ans_b.request_id == "b0" and ans_b.classes == [int(ref[10].argmax())]
        assert budget.dropped_total()["predict"] == 4  # r3..r5 and the spoofed one: over dev-a's budget
        assert svc.stats()["answered"] == 4 and svc.stats()["dropped"] == 4
    finally:
        a.stop()
        b.stop()
        svc.stop()


def test_mqtt_request_that_does_not_fit_is_refused_with_the_reason(mosquitto_broker, served):
    from server_app.models.predictor import LargePredictor, latest_export_in_registry
    from server_app.predict_service import PredictService

    svc = PredictService(LargePredictor(latest_export_in_registry(served[0])), None, host=mosquitto_broker.host,
                         port=mosquitto_broker.port).start()  # fmt: skip
    a, got = _device_link(mosquitto_broker, "dev-c")
    try:
        req = cm.PredictRequest.from_array("dev-c", "bad", np.zeros((1, 8, 8, 1), np.float32))
        a.publish(topics.device_predict_request("dev-c"), codec.encode_control(req), 1)
        assert _wait(lambda: len(got) == 1, 20)
        ans = codec.decode_control(got[0])
        assert ans.status == "refused" and "do not fit the model" in ans.reason
    finally:
        a.stop()
        svc.stop()


# ----------------------------------------------------------- a device agent with the cascade
def _agent_cfg(tmp_path: Path, data, broker, name: str, **over):
    from device_firmware_py.config import DeviceConfig

    d = tmp_path / name
    d.mkdir()
    np.savez(d / "data.npz", x=data.x_train[:64], y=data.y_train[:64])
    np.savez(d / "proxy.npz", x=data.x_train[-32:])
    return DeviceConfig(device_id=name, data_path=str(d / "data.npz"), proxy_path=str(d / "proxy.npz"),
                        state_dir=str(d / "state"), broker_url=broker.url, quantize=False, **over)  # fmt: skip


def test_agent_cascade_on_forwards_unsure_inputs_and_off_sends_nothing(tmp_path, mosquitto_broker, served, data):
    """Real ServerServices (its predict connection, budgets, the registry's newest export) and real
    agents on a private Mosquitto; a sniffer on '#' sees every predict request."""
    from device_firmware_py.agent.agent import DeviceAgent
    from device_firmware_py.mqtt import MqttClient
    from device_firmware_py.serving.client import DeviceClient
    from server_app.services import ServerOptions, ServerServices

    reg, _md, ref = served
    np.savez(tmp_path / "proxy.npz", x=data.x_train[-32:])
    np.savez(tmp_path / "test.npz", x=data.x_test[:32], y=data.y_test[:32])
    svc = ServerServices(ServerOptions(db_url=str(reg.engine.url), data_dir=str(tmp_path / "server"),
                                       proxy_path=str(tmp_path / "proxy.npz"), test_path=str(tmp_path / "test.npz"),
                                       broker_host=mosquitto_broker.host, broker_port=mosquitto_broker.port,
                                       start_orchestrator=False, leader_lock=False))  # fmt: skip
    seen: list[str] = []
    sniffer = MqttClient(f"sniff-{secrets.token_hex(3)}", mosquitto_broker.host, mosquitto_broker.port, clean_session=True)
    sniffer.subscribe("koala/v1/devices/+/up/predict", 1, lambda t, p: seen.append(t))
    assert sniffer.start(wait_s=10)
    agents = []
    try:
        svc.start()
        on = DeviceAgent(_agent_cfg(tmp_path, data, mosquitto_broker, "casc-on", cascade=True, cascade_threshold=1.0,
                                    cascade_timeout_s=10.0))  # fmt: skip
        off = DeviceAgent(_agent_cfg(tmp_path, data, mosquitto_broker, "casc-off"))
        for ag in (on, off):
            t = threading.Thread(target=ag.run, daemon=True)
            t.start()
            agents.append((ag, t))
        assert _wait(lambda: all(ag._client is not None and ag._client.connected.is_set() and ag.api is not None
                                 for ag, _ in agents), 30)  # fmt: skip
        x = data.x_test[:5]
        with DeviceClient(on.cfg.socket_path) as c:
            out = c.predict_full(x, logits=False)
        # threshold 1.0: every input is "unsure" -> the server's large model answered each one
        assert out["source"] == ["server"] * 5, out
        assert out["classes"] == ref[:5].argmax(1).tolist() and out["server_model_version"] == 2
        assert seen == [topics.device_predict_request("casc-on")]  # one request for the 5 rows
        with DeviceClient(off.cfg.socket_path) as c:
            for _ in range(3):
                out_off = c.predict_full(x, logits=False)
        assert "source" not in out_off and len(out_off["classes"]) == 5
        # confident rows stay on the device: threshold 0 never forwards
        on.cascade.threshold = 0.0
        with DeviceClient(on.cfg.socket_path) as c:
            assert c.predict_full(x, logits=False)["source"] == ["device"] * 5
        # the server goes away: unsure rows fall back to the device's answer after the timeout
        on.cascade.threshold, on.cascade.timeout_s = 1.0, 0.5
        svc.predict_service.stop()
        with DeviceClient(on.cfg.socket_path) as c:
            out = c.predict_full(x, logits=False)
        assert out["source"] == ["device"] * 5 and out["cascade_fallback"] == "timeout"
        time.sleep(0.3)
        assert all(t == topics.device_predict_request("casc-on") for t in seen) and len(seen) == 2
    finally:
        for ag, t in agents:
            ag.stop()
            t.join(10)
        sniffer.stop()
        svc.stop()
