"""Inference on the device: the Predictor, the local endpoint, DeviceClient, the agent's wiring, the CLI.

Proves: a request loop (4 client threads, batch 1 and 32) against the endpoint across 4 model
swaps has zero failures, and every answer is exactly what the model it names computes (no request
sees a half-loaded model); clear 4xx answers for every kind of bad request; an agent with
data_source = store starts empty, announces the samples an application feeds it, skips an
assignment while empty, trains on its store's snapshot, swaps the served model after the round,
and none of the raw sample bytes appear in anything it publishes; `koala-device predict` (agent
and --model) and `koala-device feed`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_firmware_py.serving.client import DeviceClient, DeviceClientError
from device_firmware_py.serving.local_api import LocalApi
from device_firmware_py.serving.predictor import Predictor
from device_firmware_py.serving.sample_store import SampleStore

ARCH = "cnn_small_8x8x1"
SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    """Five float inference models of different weights (what a swap hands the Predictor)."""
    from device_firmware_py.runtime.small_model import SmallModel

    m = SmallModel(ARCH, num_threads=1)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(5):
        m.set_weights([w + rng.normal(0, 0.3, w.shape).astype(np.float32) for w in m.get_weights()])
        out.append(m.float_inference_model())
    return out


def _sock(tmp_path: Path) -> str:
    return str(tmp_path / "a.sock")


def test_requests_across_model_swaps_never_fail(tmp_path, blobs):
    pred = Predictor()
    pred.load(blobs[0], kind="float")
    api = LocalApi(pred, socket_path=_sock(tmp_path), max_concurrent=8).start()
    x = np.random.default_rng(1).random((32, *SHAPE), dtype=np.float32)
    stop = threading.Event()
    answers: list[tuple[int, int, list[int]]] = []  # (batch, serial, classes)
    failures: list[str] = []

    def loop(k: int) -> None:
        with DeviceClient(_sock(tmp_path)) as c:
            i = 0
            while not stop.is_set():
                b = 1 if (i + k) % 2 else 32
                try:
                    out = c.predict_full(x[:b], logits=False)
                    answers.append((b, out["model"]["serial"], out["classes"]))
                except Exception as exc:  # any failure counts
                    failures.append(repr(exc))
                i += 1

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for blob in blobs[1:]:  # 4 swaps while requests run
            time.sleep(0.3)
            pred.load(blob, kind="float")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        api.stop()
    assert failures == []
    seen = {s for _, s, _ in answers}
    assert seen == {1, 2, 3, 4, 5}, seen  # every model answered: the loop spanned all swaps
    expect = {}
    for serial, blob in enumerate(blobs, 1):  # what each model computes, loaded on its own
        p = Predictor()
        p.load(blob)
        expect[serial] = p.predict(x)[0].tolist()
    for b, serial, classes in answers:
        assert classes == expect[serial][:b]  # consistent with the model it names: never half-loaded
    assert api.errors == 0 and len(answers) > 50


def _raw(path: str, request: bytes) -> tuple[int, dict]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(request)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_endpoint_errors_are_clear(tmp_path, blobs):
    pred = Predictor()
    store = SampleStore(tmp_path / "store", SHAPE, 10)
    from server_app.transport.broker import free_port

    api = LocalApi(pred, store, socket_path=_sock(tmp_path), port=free_port(), max_request_bytes=8192).start()
    c = DeviceClient(_sock(tmp_path))
    x = np.random.default_rng(2).random((3, *SHAPE), dtype=np.float32)
    try:
        with pytest.raises(DeviceClientError, match="503: no model is served yet"):
            c.predict(x)
        assert c.health() == {"ok": True, "model": False, "num_samples": 0} and c.model() is None
        pred.load(blobs[0])
        assert c.predict(x).shape == (3,) and c.predict_logits(x[0]).shape == (1, 10)
        with pytest.raises(DeviceClientError, match="404: no route /v2/predict"):
            c.request("GET", "/v2/predict")
        with pytest.raises(DeviceClientError, match="405: GET /v1/predict is not allowed; use POST"):
            c.request("GET", "/v1/predict")
        with pytest.raises(DeviceClientError, match=r"413: request body of \d+ bytes is over the limit of 8192"):
            c.predict(np.zeros((64, *SHAPE), np.float32))
        with pytest.raises(DeviceClientError, match="400: x has dtype int64"):
            c.predict(np.zeros((1, *SHAPE), np.int64))
        with pytest.raises(DeviceClientError, match="400: body is not a .npy"):
            c.request("POST", "/v1/predict", b"garbage", "application/x-npy")
        with pytest.raises(DeviceClientError, match="400: body is not JSON"):
            c.request("POST", "/v1/predict", b"{x", "application/json")
        with pytest.raises(DeviceClientError, match="400: Content-Type 'text/plain' not understood"):
            c.request("POST", "/v1/predict", b"x", "text/plain")
        with pytest.raises(DeviceClientError, match="samples need labels"):
            c.request("POST", "/v1/samples", c_npy(x), "application/x-npy")
        with pytest.raises(DeviceClientError, match="400: samples refused, nothing stored: label 10 out of range"):
            c.add_samples(x, [1, 2, 10])
        assert c.samples()["num_samples"] == 0
        # JSON bodies: numbers are inputs (JSON has no dtypes); labels must be integers
        got = c.request("POST", "/v1/predict?logits=1", json.dumps({"x": x[0].tolist()}).encode(), "application/json")
        assert len(got["classes"]) == 1 and len(got["logits"][0]) == 10
        got = c.request("POST", "/v1/samples", json.dumps({"x": x.tolist(), "y": [1, 2, 3]}).encode(), "application/json")
        assert got["num_samples"] == 3 and got["label_histogram"][1:4] == [1, 1, 1]
        status, out = _raw(_sock(tmp_path), b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 411 and out["error"] == "Content-Length required"
        # the loopback TCP listener answers the same
        tcp = DeviceClient(url=f"http://127.0.0.1:{api.bound_port}")
        assert tcp.predict(x).tolist() == c.predict(x).tolist()
    finally:
        api.stop()
    # a device that trains on its data file refuses samples with the reason
    api = LocalApi(pred, None, socket_path=_sock(tmp_path)).start()
    try:
        with pytest.raises(DeviceClientError, match="409: this device trains on its data file"):
            DeviceClient(_sock(tmp_path)).add_samples(x, [1, 2, 3])
    finally:
        api.stop()
    with pytest.raises(DeviceClientError, match="cannot reach the agent"):
        DeviceClient(_sock(tmp_path)).health()


def c_npy(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


class _Recorder:
    """Stands in for the agent's MqttClient: every publish is kept, byte for byte."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait_s: float | None = None) -> bool:
        self.sent.append((topic, bytes(payload)))
        return True

    def stop(self) -> None:
        pass


def test_agent_trains_on_fed_samples_and_swaps_served_model(tmp_path):
    from device_firmware_py.agent.agent import DeviceAgent
    from device_firmware_py.config import DeviceConfig
    from device_firmware_py.contract import codec, topics
    from device_firmware_py.contract import messages as cm
    from device_firmware_py.contract.plan import TrainingPlan
    from server_app.data.datasets import load_dataset

    ds = load_dataset("digits")
    proxy = tmp_path / "proxy.npz"
    np.savez(proxy, x=ds.x_train[:64])
    cfg = DeviceConfig(device_id="dev1", data_path="", proxy_path=str(proxy), state_dir=str(tmp_path / "s"),
                       arch="cnn_small", data_source="store", quantize=False, store_max_samples=500)  # fmt: skip
    agent = DeviceAgent(cfg)
    agent.setup()
    agent.start_serving()
    agent._client = rec = _Recorder()
    try:
        c = DeviceClient(cfg.socket_path)
        assert c.model()["kind"] == "float" and c.health()["num_samples"] == 0
        statuses = lambda: [codec.decode(p) for t, p in rec.sent if t == topics.device_status("dev1")]  # noqa: E731
        frame = lambda r: codec.encode_frame(cm.Assignment(r, "dev1", "cnn_small", plan=TrainingPlan(  # noqa: E731
            upload=("logits", "weights"), local_epochs=2), teacher_logits=np.zeros((64, 10), np.float32)))
        # empty store: the assignment is skipped honestly (no result), the status says 0 samples
        agent._on_assign(topics.device_assign("dev1"), frame(0))
        assert not [t for t, _ in rec.sent if t == topics.device_result("dev1")]
        assert statuses()[-1].num_samples == 0
        # the application feeds samples: the agent re-announces its count
        xs, ys = ds.x_train[100:260].astype(np.float32), ds.y_train[100:260]
        c.add_samples(xs[:100], ys[:100])
        agent._handle(*agent.events.get(timeout=5))
        agent._last_status = 0.0  # status re-announcements are rate-limited to one a second
        agent._housekeeping()
        assert statuses()[-1].num_samples == 100
        # a round trains on the snapshot taken at its start
        serial = c.model()["serial"]
        agent._on_assign(topics.device_assign("dev1"), frame(1))
        res = [codec.decode_for_topic(t, p)[1] for t, p in rec.sent if t == topics.device_result("dev1")]
        assert len(res) == 1 and res[0].num_samples == 100
        assert res[0].label_histogram == np.bincount(ys[:100], minlength=10).tolist()
        m = c.model()
        assert m["serial"] == serial + 1 and m["round_id"] == 1  # the new weights are served (float: quantize off)
        c.add_samples(xs[100:], ys[100:])
        agent._handle(*agent.events.get(timeout=5))
        agent._last_status = 0.0  # status re-announcements are rate-limited to one a second
        agent._housekeeping()
        assert statuses()[-1].num_samples == 160 and statuses()[-1].label_histogram == np.bincount(ys, minlength=10).tolist()
        # raw samples never leave the device: no sample's float32 (or float16) bytes in any publish
        sent = b"".join(p for _, p in rec.sent)
        assert len(sent) > 64 * 10 * 2
        for row in xs:
            assert row.tobytes() not in sent and row.astype(np.float16).tobytes() not in sent
    finally:
        agent._client = None
        agent._shutdown()
    assert not Path(cfg.socket_path).exists()  # the socket goes with the agent
    again = DeviceAgent(cfg)  # restart: the store is still there
    again.setup()
    assert again._num_samples() == 160


def test_cli_predict_and_feed(tmp_path, blobs, capsys):
    from device_firmware_py.cli import main

    pred = Predictor()
    pred.load(blobs[2])
    store = SampleStore(tmp_path / "store", SHAPE, 10)
    api = LocalApi(pred, store, socket_path=_sock(tmp_path)).start()
    rng = np.random.default_rng(3)
    x, y = rng.random((40, *SHAPE), dtype=np.float32), rng.integers(0, 10, 40)
    np.savez(tmp_path / "in.npz", x=x, y=y)
    (tmp_path / "m.tflite").write_bytes(blobs[2])
    try:
        assert main(["predict", "--socket", _sock(tmp_path), str(tmp_path / "in.npz"), "--batch", "16",
                     "--out", str(tmp_path / "c.npy")]) == 0  # fmt: skip
        via_agent = json.loads(capsys.readouterr().out)
        assert main(["predict", "--model", str(tmp_path / "m.tflite"), str(tmp_path / "in.npz")]) == 0
        local = json.loads(capsys.readouterr().out)
        assert via_agent["n"] == 40 and via_agent["accuracy"] == local["accuracy"]
        assert np.load(tmp_path / "c.npy").tolist()[:20] == local["classes"] == via_agent["classes"]
        assert main(["feed", "--socket", _sock(tmp_path), str(tmp_path / "in.npz"), "--batch", "15"]) == 0
        assert json.loads(capsys.readouterr().out)["num_samples"] == 40 == len(store)
        np.savez(tmp_path / "bad.npz", x=x, y=y + 10)
        assert main(["feed", "--socket", _sock(tmp_path), str(tmp_path / "bad.npz")]) == 1
        assert "out of range" in capsys.readouterr().err
    finally:
        api.stop()
    assert main(["predict", "--socket", _sock(tmp_path), str(tmp_path / "in.npz")]) == 1
    assert "cannot reach the agent" in capsys.readouterr().err
