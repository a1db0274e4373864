"""Protocol-level simulated devices for the reliability tests: many paho clients, one thread.

Why not the real agent: the load and bad-input tests need hundreds of devices or precise control
(answer this round, stay silent in that one, answer after the deadline); a LiteRT agent per device
would cost a process and seconds of compute each. A simulated device does what the contract asks of
a device — retained online status (offline as Last Will), subscribe to its own assignment topic,
decode the assignment frame with the contract codec, answer with a *valid* result frame (canned
finite logits of the teacher's shape, QoS 1) — over real MQTT to a real broker.

All clients are multiplexed on one selector (paho's external-loop API) in one background thread, so
200 devices cost one thread. Everything the fleet sends is counted in `sent[(device, round)]`, which
the tests compare with the registry rows.
"""

from __future__ import annotations

import contextlib
import heapq
import selectors
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm

# behaviour(device_id, round_id) -> "answer" | "silent" | float (answer after that many seconds)
Behaviour = Callable[[str, int], "str | float"]


def canned_logits(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Finite, float16-safe logits: what a trained small model would emit."""
    return (np.random.default_rng(seed).standard_normal(shape) * 2.0).astype(np.float32)


_PROXY_Y: list[np.ndarray] = []


def honest_logits(rows: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """Logits of a small model that learned something: the true class of each proxy row (the
    reliability fixture's proxy is digits x_train[:200]) plus noise. Pure noise would be no honest
    device's output, and reverse KD from it collapses the large model, which the model gate refuses."""
    if not _PROXY_Y:
        from server_app.data.datasets import load_dataset

        _PROXY_Y.append(load_dataset("digits", seed=0).y_train[:200])
    y = _PROXY_Y[0]
    out = canned_logits((len(rows), classes), seed) * 0.5
    known = rows < len(y)
    out[np.flatnonzero(known), y[rows[known]] % classes] += 4.0
    return out


def result_frame(dev: str, asg: cm.Assignment, *, arch: str = "cnn_small", seed: int = 0,
                 logits_shape: tuple[int, int] = (200, 10)) -> bytes:
    """The valid answer to an assignment: logits on the assignment's proxy rows (the teacher's
    shape, or `proxy_indices` rows, or the whole proxy set's `logits_shape` in a first round without
    a teacher), the assignment's model version and proxy digest echoed."""
    classes = asg.teacher_logits.shape[1] if asg.teacher_logits is not None else logits_shape[1]
    rows = asg.proxy_indices if asg.proxy_indices is not None else np.arange(
        len(asg.teacher_logits) if asg.teacher_logits is not None else logits_shape[0])
    shape = (len(rows), classes)
    msg = cm.Result(round_id=asg.round_id, device_id=dev, arch=arch, num_samples=100,
                    model_version=asg.model_version, label_histogram=[10] * shape[1],
                    metrics={"t_device_s": 0.0, "train_loss": 1.0}, proxy_digest=asg.proxy_digest,
                    proxy_logits=honest_logits(rows, classes, seed))  # fmt: skip
    return codec.encode_frame(msg)


class SimFleet:
    """`start()` connects every device and waits until each is subscribed; `stop()` disconnects."""

    def __init__(self, host: str, port: int, device_ids: list[str], *, behaviour: Behaviour | None = None,
                 arch: str = "cnn_small", input_shape: tuple[int, int, int] = (8, 8, 1), keepalive: int = 30,
                 logits_shape: tuple[int, int] = (200, 10), passwords: dict[str, str] | None = None,
                 ca_file: str | None = None):
        self.host, self.port = host, port
        # a hardened broker: each device logs in with its own account (and its bound client id) over TLS
        self.passwords, self.ca_file = passwords, ca_file
        self.ids = list(device_ids)
        self.behaviour: Behaviour = behaviour or (lambda d, r: "answer")
        self.arch, self.input_shape, self.keepalive = arch, input_shape, keepalive
        self.logits_shape = logits_shape
        self.sel = selectors.DefaultSelector()
        self.clients: dict[str, mqtt.Client] = {}
        self.subscribed: set[str] = set()
        self.connects: Counter[str] = Counter()
        self.assignments: Counter[tuple[str, int]] = Counter()
        self.sent: Counter[tuple[str, int]] = Counter()  # results published (PUBACK or not)
        self.acked: Counter[str] = Counter()
        self.frames: dict[tuple[str, int], bytes] = {}  # last result frame per (device, round)
        self.assigned: dict[tuple[str, int], cm.Assignment] = {}  # decoded assignments
        self.errors: list[str] = []
        self._later: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- control (any thread)
    def call(self, fn: Callable[[], None]) -> None:
        """Run fn on the fleet's thread (paho clients are driven by that thread only)."""
        with self._lock:
            self._calls.append(fn)

    def publish(self, dev: str, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.call(lambda: self.clients[dev].publish(topic, payload, qos=qos, retain=retain))

    def answer(self, dev: str, round_id: int) -> bytes:
        """Publish the valid result a silent device held back (the test decides when)."""
        frame = result_frame(dev, self.assigned[(dev, round_id)], arch=self.arch, logits_shape=self.logits_shape)
        self.frames[(dev, round_id)] = frame

        def send() -> None:
            self.clients[dev].publish(topics.device_result(dev), frame, qos=1)
            self.sent[(dev, round_id)] += 1

        self.call(send)
        return frame

    def start(self, timeout_s: float = 60.0) -> SimFleet:
        for dev in self.ids:
            cid = f"koala-dev-{dev}" if self.passwords else f"sim-{dev}"
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True,
                            protocol=mqtt.MQTTv311, userdata=dev)  # fmt: skip
            if self.passwords:
                c.username_pw_set(dev, self.passwords[dev])
            if self.ca_file:
                c.tls_set(ca_certs=self.ca_file)
            c.max_inflight_messages_set(20)
            offline = codec.encode_control(cm.DeviceStatus(device_id=dev, state="offline"))
            c.will_set(topics.device_status(dev), offline, qos=1, retain=True)
            c.reconnect_delay_set(0.2, 2.0)
            c.on_socket_open = lambda cl, _u, s: self.sel.register(s, selectors.EVENT_READ, cl)
            c.on_socket_close = lambda _cl, _u, s: self._unregister(s)
            c.on_socket_register_write = lambda cl, _u, s: self.sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE, cl)
            c.on_socket_unregister_write = lambda cl, _u, s: self.sel.modify(s, selectors.EVENT_READ, cl)
            c.on_connect, c.on_subscribe, c.on_message = self._on_connect, self._on_subscribe, self._on_message
            c.on_publish = lambda _c, d, *_a: self.acked.__setitem__(d, self.acked[d] + 1)
            self.clients[dev] = c
            c.connect(self.host, self.port, keepalive=self.keepalive)
        self._thread = threading.Thread(target=self._loop, name="simfleet", daemon=True)
        self._thread.start()
        t_end = time.monotonic() + timeout_s
        while len(self.subscribed) < len(self.ids):
            if time.monotonic() > t_end:
                raise TimeoutError(f"{len(self.subscribed)}/{len(self.ids)} simulated devices subscribed")
            time.sleep(0.05)
        return self

    def stop(self, clean: bool = True) -> None:
        """clean=False: drop the sockets without DISCONNECT, so the broker fires each Last Will."""
        def bye() -> None:
            for c in self.clients.values():
                with contextlib.suppress(Exception):
                    if clean:
                        c.disconnect()
                        c.loop_write()
                    else:
                        sock = c.socket()
                        if sock is not None:
                            sock.close()
            self._stop.set()

        self.call(bye)
        if self._thread is not None:
            self._thread.join(15)

    def wait(self, cond: Callable[[], bool], timeout_s: float) -> bool:
        t_end = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > t_end:
                return False
            time.sleep(0.05)
        return True

    # -------------------------------------------------------------------- fleet thread
    def _unregister(self, s: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(s)

    def _on_connect(self, c: mqtt.Client, dev: str, _f: Any, rc: Any, _p: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            self.errors.append(f"connect refused {dev}: {rc}")
            return
        self.connects[dev] += 1
        c.subscribe(topics.device_assign(dev), 1)
        status = cm.DeviceStatus(device_id=dev, state="online", arch=self.arch, input_shape=list(self.input_shape),
                                 runtime_version="sim", num_samples=100, label_histogram=[10] * 10)  # fmt: skip
        c.publish(topics.device_status(dev), codec.encode_control(status), qos=1, retain=True)

    def _on_subscribe(self, _c: mqtt.Client, dev: str, *_a: Any) -> None:
        self.subscribed.add(dev)

    def _on_message(self, c: mqtt.Client, dev: str, msg: Any) -> None:
        try:
            asg = codec.decode_frame(bytes(msg.payload), cm.Assignment)
        except Exception as exc:
            self.errors.append(f"bad assignment for {dev}: {exc!r}")
            return
        self.assignments[(dev, asg.round_id)] += 1
        self.assigned[(dev, asg.round_id)] = asg
        what = self.behaviour(dev, asg.round_id)
        if what == "silent":
            return
        frame = result_frame(dev, asg, arch=self.arch, logits_shape=self.logits_shape)
        self.frames[(dev, asg.round_id)] = frame

        def send() -> None:
            c.publish(topics.device_result(dev), frame, qos=1)
            self.sent[(dev, asg.round_id)] += 1

        if isinstance(what, (int, float)) and not isinstance(what, bool):
            self._seq += 1
            heapq.heappush(self._later, (time.monotonic() + float(what), self._seq, send))
        else:
            send()

    def _loop(self) -> None:
        last_misc = 0.0
        while not self._stop.is_set():
            with self._lock:
                calls, self._calls = self._calls, []
            for fn in calls:
                try:
                    fn()
                except Exception as exc:  # a test-side mistake shows up in .errors, not as a hang
                    self.errors.append(repr(exc))
            now = time.monotonic()
            while self._later and self._later[0][0] <= now:
                heapq.heappop(self._later)[2]()
            for key, mask in self.sel.select(0.02):
                cl: mqtt.Client = key.data
                if mask & selectors.EVENT_READ:
                    cl.loop_read()
                if mask & selectors.EVENT_WRITE:
                    cl.loop_write()
            if now - last_misc > 0.5:  # keepalive pings and reconnects (paho's loop_misc)
                last_misc = now
                for cl in self.clients.values():
                    if cl.loop_misc() == mqtt.MQTT_ERR_NO_CONN:
                        with contextlib.suppress(Exception):
                            cl.reconnect()
