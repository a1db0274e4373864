"""Small and large model together: the edge-cloud cascade on Fashion-MNIST (issue 30, `cascade` of
bench/results/models_at_work.json, plot bench/results/cascade.png).

1. A KOALA run (the `koala sim` machinery, server_app/sim/runner.run_method): Fashion-MNIST, 20 devices,
   Dirichlet 0.5, 300 training images each, 5,000 proxy images, koala_homo (cnn_small, the default
   policy otherwise), 5 rounds (--rounds), one torch thread.
2. The final large model, exported as the server exports it (server_app/models/export.write_export),
   served by the real LargePredictor; one device's small model re-quantized to full int8 on its own
   data as the agent does (SmallModel.quantize_int8, 128 calibration rows). The device is the one with
   the median int8 accuracy; `devices` summarises the first DEVICES_SUMMARY devices the same way.
3. On all 10,000 test images: device_only_acc (the int8 model), server_only_acc (the large model on
   the inputs as the cascade sends them: float16 on the wire), and for each threshold the share of
   images whose top int8 softmax probability is below it (offload_fraction) and the accuracy when
   those get the large model's answer.
4. Bytes and latency per offloaded sample over a real round trip: a private Mosquitto on loopback,
   the server's PredictService (its own MQTT connection, per-device budget raised for the bench to
   1000/s: the default 5/s would pace the loop, not measure it; one torch thread), a device-side Cascade on its own
   MqttClient asking for N_LATENCY low-confidence test images one at a time. Bytes are the contract
   codec's PredictRequest / PredictAnswer payloads, plus the MQTT PUBLISH framing (fixed header,
   topic, packet id) and the PUBACK of each direction.

    .venv/bin/python -m bench.cascade            # ~10 min on 2 shared cores
    .venv/bin/python -m bench.cascade --quick    # 4 devices, 1 round, 1,000 test images: a smoke run (writes nothing)

Only the `cascade` key of models_at_work.json is rewritten (read-modify-write).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
N_LATENCY = 300
DEVICES_SUMMARY = 5


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _mqtt_packet_bytes(topic: str, payload: int, qos: int = 1) -> int:
    """A PUBLISH packet's size on the wire (MQTT 3.1.1) + the PUBACK that acknowledges it."""
    rem = 2 + len(topic.encode()) + (2 if qos else 0) + payload
    varint = 1 if rem < 128 else 2 if rem < 16_384 else 3 if rem < 2_097_152 else 4
    return 1 + varint + rem + (4 if qos else 0)


def cascade_rows(dev_logits: np.ndarray, server_pred: np.ndarray, y: np.ndarray, thresholds=THRESHOLDS) -> list[dict[str, Any]]:
    conf = _softmax(dev_logits.astype(np.float64)).max(1)
    dev_pred = dev_logits.argmax(1)
    rows = []
    for t in thresholds:
        off = conf < t
        pred = np.where(off, server_pred, dev_pred)
        rows.append({"threshold": t, "offload_fraction": round(float(off.mean()), 4), "accuracy": round(float((pred == y).mean()), 4)})
    return rows


def train(quick: bool, rounds: int, seed: int) -> dict[str, Any]:
    """The KOALA run; returns the strategy, the fleet, the data and the run's row."""
    import server_app.engine.strategies as strategies
    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split
    from server_app.engine.fleet import InMemoryFleet
    from server_app.policy import KoalaPolicy
    from server_app.sim.config import SimConfig
    from server_app.sim.runner import run_method

    pol = KoalaPolicy(strategy="koala_homo", archs=["cnn_small"], rounds=1 if quick else rounds, seed=seed)
    cfg = SimConfig(dataset="fashion-mnist", devices=4 if quick else 20, alpha=0.5, proxy_size=1000 if quick else 5000,
                    train_size=1200 if quick else 6000, policy=pol, eval_samples=1000 if quick else None,
                    small_eval_samples=500, torch_threads=1)  # fmt: skip
    ds = load_dataset(cfg.dataset, seed=seed)
    split = make_federated_split(ds.y_train, cfg.devices, cfg.proxy_size, seed, cfg.alpha, cfg.min_samples, cfg.train_size)
    got: dict[str, Any] = {}
    orig = strategies.build_strategy

    def capture_strategy(*a: Any, **k: Any) -> Any:
        got["strategy"] = orig(*a, **k)
        return got["strategy"]

    def capture_fleet(*a: Any, **k: Any) -> Any:
        got["fleet"] = InMemoryFleet(*a, **k)
        return got["fleet"]

    strategies.build_strategy = capture_strategy
    try:
        res = run_method(cfg, cfg.method_specs()[0], ds, split, progress=False, fleet_factory=capture_fleet)
    finally:
        strategies.build_strategy = orig
    return {**got, "ds": ds, "split": split, "cfg": cfg, "policy": pol, "row": res["row"], "curve": res["curve"]}


def device_int8(fleet: Any, device_id: str, x_test: np.ndarray) -> tuple[np.ndarray, int]:
    """The device's small model re-quantized to int8 on its own data (as the agent does): test logits."""
    from device_firmware_py.runtime.quantize import TFLiteLogits

    dev = fleet._devices[device_id]
    model = fleet.model(device_id)
    blob = model.quantize_int8(dev.x, max_samples=128)
    return TFLiteLogits(blob, num_threads=1, batch=256)(x_test), len(blob)


def _nodelay(link: Any) -> None:
    """TCP_NODELAY on a MqttClient's socket (paho does not set it; Mosquitto does on its side)."""
    import socket

    link.client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def measure_round_trip(edir_root: Path, x_low: np.ndarray, n: int, nodelay: bool = False) -> dict[str, Any]:
    """Real broker round trips: device Cascade -> Mosquitto -> PredictService (LargePredictor) -> back."""
    import torch

    from device_firmware_py.contract import codec, topics
    from device_firmware_py.contract import messages as cm
    from device_firmware_py.mqtt import MqttClient
    from device_firmware_py.serving.cascade import Cascade
    from server_app.ingest_budget import Budgets, DeviceBudget
    from server_app.models.predictor import LargePredictor, latest_export_in_dir
    from server_app.predict_service import PredictService
    from server_app.transport.broker import MosquittoBroker

    # one intra-op thread: a one-image forward pass gains nothing from more, and on a loaded host two
    # OpenMP threads wait for each other (measured here: 1.0 ms p50 with 1 thread, 35 ms with 2)
    torch.set_num_threads(1)
    predictor = LargePredictor(latest_export_in_dir(edir_root))
    t_srv = []
    for i in range(min(n, 200)):  # the server's part alone: one-row forward pass
        t0 = time.perf_counter()
        predictor.predict(x_low[i : i + 1])
        t_srv.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as td, MosquittoBroker(workdir=Path(td), persistence=False) as broker:
        svc = PredictService(predictor, DeviceBudget(Budgets(predict_per_s=1000.0, predict_burst=1000)),
                             host=broker.host, port=broker.port)  # fmt: skip
        if nodelay:
            _nodelay(svc.link)
        svc.start()
        dev = "bench-dev"
        link = MqttClient(f"koala-dev-{dev}", broker.host, broker.port, clean_session=True)
        casc = Cascade(dev, lambda t, p: link.publish(t, p, qos=1), link.connected.is_set, threshold=1.0, timeout_s=5.0,
                       per_s=1e6, burst=10**6)  # fmt: skip
        link.subscribe(topics.device_predict_answer(dev), 1, casc.on_answer)
        if nodelay:
            _nodelay(link)
        assert link.start(wait_s=10)
        time.sleep(0.3)
        for i in range(10):  # warm-up (connections, first forward passes)
            casc.ask(x_low[i : i + 1])
        for k in casc.stats:
            casc.stats[k] = 0
        lat, fails = [], 0
        for i in range(n):
            t0 = time.perf_counter()
            got, _v, _why = casc.ask(x_low[i % len(x_low) : i % len(x_low) + 1])
            lat.append(time.perf_counter() - t0)
            fails += got is None
        st = dict(casc.stats)
        # a batch: 32 unsure rows of one application request travel in one message
        req32 = codec.encode_control(cm.PredictRequest.from_array(dev, "0123456789abcdef", x_low[:32], "float16"))
        t0 = time.perf_counter()
        casc.ask(x_low[:32])
        lat32 = time.perf_counter() - t0
        link.stop()
        svc.stop()
    req_topic, ans_topic = topics.device_predict_request(dev), topics.device_predict_answer(dev)
    req_b, ans_b = st["bytes_up"] / st["requests"], st["bytes_down"] / max(1, st["answers"])
    ms = np.asarray(lat) * 1e3
    return {
        "n_requests": n, "failures": int(fails), "wire_dtype": "float16", "client_tcp_nodelay": nodelay,
        "request_payload_bytes": round(req_b, 1), "answer_payload_bytes": round(ans_b, 1),
        "bytes_per_offloaded_sample": round(req_b + ans_b, 1),
        "mqtt_bytes_per_offloaded_sample": _mqtt_packet_bytes(req_topic, int(round(req_b))) + _mqtt_packet_bytes(ans_topic, int(round(ans_b))),
        "raw_input_bytes_float32": int(np.prod(x_low.shape[1:]) * 4),
        "bytes_per_sample_in_32_row_request": round(len(req32) / 32, 1),
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 3), "p90": round(float(np.percentile(ms, 90)), 3),
                       "p99": round(float(np.percentile(ms, 99)), 3), "mean": round(float(ms.mean()), 3)},
        "latency_ms_32_row_request": round(lat32 * 1e3, 3),
        "server_forward_ms_p50": round(float(np.percentile(np.asarray(t_srv) * 1e3, 50)), 3),
        "path": "device Cascade (MqttClient) -> Mosquitto 127.0.0.1 -> PredictService (own MQTT connection, budget check, "
                "worker thread, LargePredictor on CPU) -> device's down/predict -> Cascade; one request in flight",
    }  # fmt: skip


def round_trip_only(seed: int = 0) -> dict[str, Any]:
    """The round trip alone, with the clients' TCP_NODELAY on and off, on the default large model
    (untrained: latency and bytes do not depend on the weights) and Fashion-MNIST test images."""
    import torch

    from server_app.data.datasets import load_dataset
    from server_app.models import export as mx
    from server_app.models.card import ExportContext
    from server_app.models.large import build_large_model
    from server_app.policy import KoalaPolicy

    ds = load_dataset("fashion-mnist", seed=seed)
    pol = KoalaPolicy(strategy="koala_homo", archs=["cnn_small"])
    large = build_large_model(pol.large, ds.input_shape, ds.num_classes, seed)
    out = {}
    with tempfile.TemporaryDirectory() as td:
        md = Path(td) / "models"
        ctx = ExportContext.from_policy(pol, ds.input_shape, ds.num_classes, dataset="fashion-mnist",
                                        data={"test_size": len(ds.y_test)}, calibration_x=ds.x_train[:256])  # fmt: skip
        mx.write_export(md, 1, {"version": 1, "large": {k: v.detach().clone() for k, v in large.state_dict().items()},
                                "small": {}}, ctx, round_id=0)  # fmt: skip
        torch.set_num_threads(1)
        for nd in (False, True):
            out["tcp_nodelay" if nd else "default"] = measure_round_trip(md, ds.x_test[:512], N_LATENCY, nodelay=nd)
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for d in out.get("devices", []):
        if d["device"] != out["device"]:
            xs = [0.0] + [r["offload_fraction"] for r in d["rows"]] + [1.0]
            ys = [d["device_only_acc"]] + [r["accuracy"] for r in d["rows"]] + [out["server_only_acc"]]
            ax.plot(xs, ys, color="0.8", lw=1, zorder=1)
    rows = out["rows"]
    xs = [0.0] + [r["offload_fraction"] for r in rows] + [1.0]
    ys = [out["device_only_acc"]] + [r["accuracy"] for r in rows] + [out["server_only_acc"]]
    ax.plot(xs, ys, "o-", color="C0", zorder=3, label=f"cascade ({out['device']}, int8 {out['arch']})")
    for r in rows:
        ax.annotate(f"{r['threshold']:g}", (r["offload_fraction"], r["accuracy"]), textcoords="offset points",
                    xytext=(4, -11), fontsize=7, color="C0")  # fmt: skip
    ax.axhline(out["device_only_acc"], color="C1", ls="--", lw=1, label=f"device only {out['device_only_acc']:.3f}")
    ax.axhline(out["server_only_acc"], color="C2", ls="--", lw=1, label=f"server only {out['server_only_acc']:.3f}")
    rt = out["round_trip"]
    ax.set_xlabel("share of inputs sent to the server (offload fraction)")
    ax.set_ylabel("accuracy (Fashion-MNIST test, 10,000)")
    ax.set_title(f"Edge-cloud cascade after {out['koala_run']['rounds']} KOALA rounds; labels: threshold\n"
                 f"per offloaded input +{rt['mqtt_bytes_per_offloaded_sample'] / 1024:.1f} KiB, "
                 f"+{rt['latency_ms']['p50']:.1f} ms p50 (MQTT loopback)", fontsize=9)  # fmt: skip
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(quick: bool = False, rounds: int = 5, seed: int = 0) -> dict[str, Any]:
    import torch

    from server_app.models import export as mx
    from server_app.models.card import ExportContext

    t_start = time.perf_counter()
    run = train(quick, rounds, seed)
    ds, strategy, fleet = run["ds"], run["strategy"], run["fleet"]
    n_test = 1000 if quick else len(ds.y_test)
    x, y = ds.x_test[:n_test], ds.y_test[:n_test]
    t_trained = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        md = Path(td) / "models"
        ctx = ExportContext.from_policy(run["policy"], ds.input_shape, ds.num_classes, dataset="fashion-mnist",
                                        data={"proxy_size": len(run["split"].proxy_indices), "test_size": len(ds.y_test)},
                                        calibration_x=ds.x_train[run["split"].proxy_indices[:256]])  # fmt: skip
        edir = mx.write_export(md, run["policy"].rounds, strategy.state_dict(), ctx, round_id=run["policy"].rounds - 1)
        large = mx.load_large(edir)
        with torch.no_grad():
            srv32 = np.concatenate([large(torch.from_numpy(x[i : i + 500])).numpy() for i in range(0, len(x), 500)])
            x16 = x.astype(np.float16).astype(np.float32)  # what the cascade sends
            srv16 = np.concatenate([large(torch.from_numpy(x16[i : i + 500])).numpy() for i in range(0, len(x), 500)])
        server_pred = srv16.argmax(1)
        ids = sorted(fleet._devices)[:DEVICES_SUMMARY]
        devices = []
        for d in ids:
            logits, nbytes = device_int8(fleet, d, x)
            devices.append({"device": d, "num_samples": int(len(fleet._devices[d].y)), "int8_bytes": nbytes,
                            "device_only_acc": round(float((logits.argmax(1) == y).mean()), 4),
                            "rows": cascade_rows(logits, server_pred, y), "_logits": logits})  # fmt: skip
        med = sorted(devices, key=lambda d: d["device_only_acc"])[len(devices) // 2]
        conf = _softmax(med["_logits"].astype(np.float64)).max(1)
        order = np.argsort(conf)  # the least confident test images: what the cascade would send
        rt = measure_round_trip(md, x[order[: max(64, N_LATENCY)]], 50 if quick else N_LATENCY)
    for d in devices:
        d.pop("_logits")
    per_sample, lat = rt["mqtt_bytes_per_offloaded_sample"], rt["latency_ms"]["mean"]
    rows = []
    for r in med["rows"]:
        rows.append({**r, "added_bytes_per_input": round(r["offload_fraction"] * per_sample, 1),
                     "added_latency_ms_per_input": round(r["offload_fraction"] * lat, 3)})  # fmt: skip
    out = {
        "what": "cascade: the device's int8 cnn_small answers; inputs whose top softmax probability is below the "
                "threshold get the server's large model's answer instead (over MQTT, docs/device-serving.md)",
        "dataset": "fashion-mnist", "test_images": int(n_test),
        "koala_run": {"strategy": "koala_homo", "arch": "cnn_small", "devices": run["cfg"].devices, "alpha": run["cfg"].alpha,
                      "train_size": run["cfg"].train_size, "proxy_size": run["cfg"].proxy_size,
                      "rounds": run["policy"].rounds, "seed": seed, "large_test_acc": run["row"]["large_test_acc"],
                      "small_test_acc_mean": run["row"]["small_test_acc_mean"], "wall_s": round(run["row"]["wall_s"], 1)},
        "device": med["device"], "arch": "cnn_small", "int8_bytes": med["int8_bytes"],
        "device_only_acc": med["device_only_acc"],
        "server_only_acc": round(float((server_pred == y).mean()), 4),
        "server_only_acc_float32_inputs": round(float((srv32.argmax(1) == y).mean()), 4),
        "server_float16_argmax_agreement": round(float((srv32.argmax(1) == server_pred).mean()), 4),
        "rows": rows,
        "bytes_per_offloaded_sample": rt["bytes_per_offloaded_sample"],
        "mqtt_bytes_per_offloaded_sample": rt["mqtt_bytes_per_offloaded_sample"],
        "latency_ms_per_offloaded_sample": rt["latency_ms"],
        "round_trip": rt,
        "devices": devices,
        "host": {"cpus": os.cpu_count(), "note": "2 cores shared with other work; loopback broker"},
        "command": "python -m bench.cascade" + (" --quick" if quick else ""),
        "commit": _commit(), "wall_s": round(time.perf_counter() - t_start, 1),
        "wall_s_after_training": round(time.perf_counter() - t_trained, 1),
    }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--round-trip-only", action="store_true",
                    help="only the MQTT round trip, clients' TCP_NODELAY off and on -> cascade.round_trip_nodelay_check")
    a = ap.parse_args(argv)
    if a.round_trip_only:
        rt = round_trip_only(a.seed)
        print(json.dumps(rt, indent=1))
        if not a.no_write:
            path = RESULTS / "models_at_work.json"
            data = json.loads(path.read_text())
            data.setdefault("cascade", {})["round_trip_nodelay_check"] = {**rt, "command": "python -m bench.cascade --round-trip-only",
                                                                         "commit": _commit()}  # fmt: skip
            path.write_text(json.dumps(data, indent=1) + "\n")
        return
    out = measure(a.quick, a.rounds, a.seed)
    print(json.dumps({k: v for k, v in out.items() if k != "devices"}, indent=1))
    if a.no_write or a.quick:  # a smoke run never replaces the measured numbers
        plot(out, Path(tempfile.gettempdir()) / "cascade.quick.png")
        return
    path = RESULTS / "models_at_work.json"
    data = json.loads(path.read_text()) if path.is_file() else {}  # read-modify-write: only `cascade`
    data["cascade"] = out
    path.write_text(json.dumps(data, indent=1) + "\n")
    plot(out, RESULTS / "cascade.png")
    print(f"wrote {path} [cascade] and {RESULTS / 'cascade.png'}")


if __name__ == "__main__":
    main()
