"""Protocol-level simulated devices: many paho clients driven by ONE selector loop in one process.

Why not the real agent: 1,000 agents would be 1,000 processes with LiteRT interpreters; the fleet
benchmark measures the server's round overhead, so a device here does only what the protocol asks
— retained online status, subscribe to its assignment topic, decode the assignment frame (the same
validation a device runs), answer with a valid result frame of canned proxy logits (QoS 1). Real
MQTT, real paho, real contract codec; no threads per client (paho's external-loop API).

Roles (run as `python -m bench.swarm ROLE ...`, one JSON line per event on stdout):
  devices  N devices; prints {"ready": N, ...} once all are subscribed; runs until stdin closes.
  publish  one client publishes M pre-encoded result frames for dev-0..dev-M-1 and waits for every
           PUBACK; prints {"published": M, "t_publish_s": ...}. Used by the ingestion benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm

ARCH = "cnn_small"


def device_id(i: int) -> str:
    return f"dev-{i:05d}"


def canned_logits(p: int, c: int, seed: int) -> np.ndarray:
    """Valid, finite, float16-safe proxy logits (what a trained small model would emit)."""
    return (np.random.default_rng(seed).standard_normal((p, c)) * 3.0).astype(np.float32)


def result_frame(dev: str, round_id: int, logits: np.ndarray, *, model_version: int = 0,
                 dtype: str = "float16", proxy_digest: str | None = None, t_device_s: float = 0.0) -> bytes:
    hist = np.bincount(np.arange(100) % logits.shape[1], minlength=logits.shape[1]).tolist()  # 100 samples
    msg = cm.Result(round_id=round_id, device_id=dev, arch=ARCH, num_samples=100, model_version=model_version,
                    label_histogram=hist, metrics={"t_device_s": t_device_s}, proxy_digest=proxy_digest,
                    proxy_logits=logits)  # fmt: skip
    return codec.encode_frame(msg, logits_dtype=dtype)


class Pool:
    """paho clients multiplexed on one selector (on_socket_* callbacks: paho's external loop API)."""

    def __init__(self, host: str, port: int, keepalive: int = 120):
        self.host, self.port, self.keepalive = host, port, keepalive
        self.sel = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self._last_misc = time.monotonic()

    def add(self, client_id: str, *, inflight: int = 20) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                        protocol=mqtt.MQTTv311)  # fmt: skip
        c.max_inflight_messages_set(inflight)
        c.on_socket_open = lambda cl, _u, s: self.sel.register(s, selectors.EVENT_READ, cl)
        c.on_socket_close = lambda _cl, _u, s: self._unregister(s)
        c.on_socket_register_write = lambda cl, _u, s: self.sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE, cl)
        c.on_socket_unregister_write = lambda cl, _u, s: self.sel.modify(s, selectors.EVENT_READ, cl)
        self.clients.append(c)
        return c

    def _unregister(self, s: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(s)

    def connect(self, c: mqtt.Client) -> None:
        c.connect(self.host, self.port, keepalive=self.keepalive)

    def step(self, timeout: float = 0.05) -> None:
        for key, mask in self.sel.select(timeout):
            c: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE:
                c.loop_write()
        now = time.monotonic()
        if now - self._last_misc > 1.0:
            self._last_misc = now
            for c in self.clients:
                c.loop_misc()

    def run_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        t_end = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > t_end:
                return False
            self.step()
        return True


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def run_devices(a: argparse.Namespace) -> int:
    pool = Pool(a.host, a.port)
    logits_cache: dict[tuple[int, int], np.ndarray] = {}
    state = {"subscribed": 0, "connected": 0, "assignments": 0, "results": 0, "bad": 0, "encode_s": 0.0}

    def on_connect(c: mqtt.Client, dev: str, _f: Any, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            emit(error=f"connect refused {dev}: {rc}")
            return
        state["connected"] += 1
        c.subscribe(topics.device_assign(dev), 1)
        status = cm.DeviceStatus(device_id=dev, state="online", arch=ARCH, input_shape=[28, 28, 1],
                                 runtime_version="swarm", num_samples=100, label_histogram=[10] * 10)  # fmt: skip
        c.publish(topics.device_status(dev), codec.encode_control(status), qos=1, retain=True)

    def on_subscribe(_c: mqtt.Client, _dev: str, _mid: Any, _rc: Any, _p: Any = None) -> None:
        state["subscribed"] += 1

    def on_message(c: mqtt.Client, dev: str, msg: Any) -> None:
        t0 = time.perf_counter()
        state["assignments"] += 1
        try:
            asg = codec.decode_frame(bytes(msg.payload), cm.Assignment)
        except Exception as exc:  # a protocol bug shows up in the benchmark output, not as a hang
            state["bad"] += 1
            emit(error=f"bad assignment for {dev}: {exc!r}")
            return
        shape = (a.proxy, a.classes) if asg.teacher_logits is None else tuple(asg.teacher_logits.shape)
        logits = logits_cache.get(shape)
        if logits is None:
            logits = logits_cache[shape] = canned_logits(*shape, seed=a.seed)
        frame = result_frame(dev, asg.round_id, logits, model_version=asg.model_version, proxy_digest=asg.proxy_digest)
        state["encode_s"] += time.perf_counter() - t0
        c.publish(topics.device_result(dev), frame, qos=1)
        state["results"] += 1

    t0 = time.perf_counter()
    failed = 0
    for i in range(a.offset, a.offset + a.n):
        dev = device_id(i)
        c = pool.add(dev)
        c.user_data_set(dev)
        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        try:
            pool.connect(c)
        except OSError as exc:  # fd limit / broker refusing: report how far we got
            failed += 1
            emit(error=f"connect {dev}: {exc!r}")
            break
        if i % 50 == 49:
            pool.step(0)  # drain CONNACKs as we go so the broker's accept backlog never overflows
    ok = pool.run_until(lambda: state["subscribed"] >= len(pool.clients) - failed, a.ready_timeout)
    emit(ready=state["subscribed"], requested=a.n, connect_s=round(time.perf_counter() - t0, 3), complete=ok,
         rss_mib=_rss(), fds=len(os.listdir("/proc/self/fd")))  # fmt: skip
    sel_stdin = selectors.DefaultSelector()
    sel_stdin.register(sys.stdin, selectors.EVENT_READ)
    last_report = 0
    while True:
        pool.step(0.02)
        if sel_stdin.select(0):
            line = sys.stdin.readline()
            if not line or line.strip() == "stop":
                break
            if line.strip() == "stats":
                emit(stats=dict(state), rss_mib=_rss())
        if state["results"] != last_report and state["results"] % max(1, a.n) == 0:
            last_report = state["results"]
    for c in pool.clients:
        try:
            c.disconnect()
            c.loop_write()
        except Exception:
            pass
    emit(done=True, stats=state)
    return 0


def run_publish(a: argparse.Namespace) -> int:
    """Publish M distinct result frames (QoS 1), wait for every PUBACK."""
    logits = canned_logits(a.proxy, a.classes, a.seed)
    frames = [(topics.device_result(device_id(i)), result_frame(device_id(i), a.round, logits, dtype=a.dtype))
              for i in range(a.m)]  # fmt: skip
    pool = Pool(a.host, a.port)
    c = pool.add(f"bench-pub-{os.getpid()}", inflight=a.inflight)
    c.max_queued_messages_set(0)
    acked = {"n": 0, "conn": False}
    c.on_connect = lambda *_: acked.__setitem__("conn", True)
    c.on_publish = lambda *_: acked.__setitem__("n", acked["n"] + 1)
    pool.connect(c)
    pool.run_until(lambda: acked["conn"], 10)
    emit(ready=True, payload_bytes=len(frames[0][1]), frames=len(frames))
    if sys.stdin.readline().strip() != "go":
        return 1
    t0 = time.perf_counter()
    for topic, payload in frames:
        c.publish(topic, payload, qos=1)
    ok = pool.run_until(lambda: acked["n"] >= len(frames), a.timeout)
    emit(published=acked["n"], complete=ok, t_publish_s=time.perf_counter() - t0, t0_wall=time.time() - (time.perf_counter() - t0))
    sys.stdin.readline()
    c.disconnect()
    c.loop_write()
    return 0


def _rss() -> float | None:
    from bench.common import rss_mib

    return rss_mib()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.swarm")
    sub = p.add_subparsers(dest="role", required=True)
    for name in ("devices", "publish"):
        s = sub.add_parser(name)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--proxy", type=int, default=5000)
        s.add_argument("--classes", type=int, default=10)
        s.add_argument("--seed", type=int, default=0)
    d = sub.choices["devices"]
    d.add_argument("--n", type=int, required=True)
    d.add_argument("--offset", type=int, default=0)
    d.add_argument("--ready-timeout", type=float, default=120.0)
    pb = sub.choices["publish"]
    pb.add_argument("--m", type=int, required=True)
    pb.add_argument("--round", type=int, default=1)
    pb.add_argument("--dtype", default="float16")
    pb.add_argument("--inflight", type=int, default=20)
    pb.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    return run_devices(a) if a.role == "devices" else run_publish(a)


if __name__ == "__main__":
    sys.exit(main())
