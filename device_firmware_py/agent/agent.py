"""DeviceAgent: one IoT device in a KOALA fleet, speaking the MQTT contract.

What it does (design §2, steps 2-4):
  * announces itself with a retained `status` (arch, sample count, label histogram, runtime
    version); its Last Will is the retained `offline` status, so monitors see a dead device;
  * on an assignment: runs `device_firmware_py.task.execute_assignment` (forward KD from the
    teacher logits -> local training -> proxy logits [+ weights]), publishes progress (QoS 0) and
    the result (QoS 1), then re-quantizes its int8 inference model and serves inference with it;
  * keeps model + round state on disk (atomic writes): a restarted agent re-publishes a
    finished result while its round is still collecting, or redoes an unfinished assignment;
  * serves its current model to applications on the device (device_firmware_py.serving: a local
    HTTP endpoint on a Unix socket; the model is swapped atomically after each round) and, with
    `data_source = store`, trains on the labeled samples those applications hand in (a bounded
    on-device store: a snapshot of it at each round's start; raw samples never leave the device).

Threading: the paho network thread only enqueues events; all work runs on the agent's own thread,
so a 20 s training step never starves keepalives and no state needs a lock. The endpoint's threads
touch only the Predictor (an atomic reference) and the SampleStore (its own lock), and tell the
agent thread about new samples through the same event queue.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
import time
from typing import Any

import numpy as np

from device_firmware_py.agent.state import PHASE_ASSIGNED, PHASE_DONE, AgentState, RoundState
from device_firmware_py.config import DeviceConfig, file_sha256
from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.errors import ContractError
from device_firmware_py.datafiles import load_small, open_array
from device_firmware_py.mqtt import MqttClient, Will
from device_firmware_py.serving.predictor import Predictor
from device_firmware_py.task import execute_assignment, label_histogram

log = logging.getLogger("koala.agent")


def peak_rss_mib() -> float | None:
    """This process's peak resident set (VmHWM) in MiB; None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _kv(**kw: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in kw.items())


class DeviceAgent:
    """Create, then `run()` (blocks until `stop()`), or `start()` / `stop()` around a thread."""

    def __init__(self, cfg: DeviceConfig):
        self.cfg = cfg
        self.state = AgentState(cfg.state_dir)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._client: Any = None
        self._round: RoundState | None = None
        self._published_result_for: int | None = None  # round whose result this process has sent
        self.predictor = Predictor(num_threads=cfg.num_threads)  # the served model (atomic swaps)
        self.int8_info: dict[str, Any] = {}
        self.store: Any = None  # SampleStore when data_source = store
        self.api: Any = None  # LocalApi while serving
        self.cascade: Any = None  # serving.cascade.Cascade when cfg.cascade (opt-in: it sends inputs to the server)
        self._status_dirty = False  # the store changed: re-announce num_samples / histogram
        self._last_status = 0.0
        self._next_spool = 0.0
        self.model: Any = None
        self.last_verdict: dict[str, Any] | None = None  # the server's last ResultVerdict for us

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Load data, proxy set, model (+ saved weights) and the last int8 model. No network."""
        from device_firmware_py.runtime.interpreter import RUNTIME
        from device_firmware_py.runtime.manifest import format_input
        from device_firmware_py.runtime.small_model import SmallModel

        cfg = self.cfg
        cfg.check_files()
        if cfg.low_memory:  # freed LiteRT buffers go back to the OS instead of staying in the heap
            from device_firmware_py.runtime import cmalloc

            cmalloc.fix_mmap_threshold()
        # Inputs stay on disk, memory-mapped: training reads a batch's rows, not a copy of the set.
        cache = self.state.cache_dir
        self.proxy_x = open_array(cfg.proxy_path, "x", cache, float32=True)
        if cfg.data_source == "file":
            self.x = open_array(cfg.data_path, "x", cache, float32=True)
            self.y = load_small(cfg.data_path, "y").astype(np.int64)
            like = self.x
        else:  # the store decides the data; the proxy inputs have the model's input shape
            like = self.proxy_x
        self.proxy_digest = cfg.proxy_sha256 or file_sha256(cfg.proxy_path)
        self.test: tuple[np.ndarray, np.ndarray] | None = None
        if cfg.test_path:
            self.test = (open_array(cfg.test_path, "x", cache, float32=True), load_small(cfg.test_path, "y").astype(np.int64))
        shape = tuple(int(s) for s in (like.shape[1:] if like.ndim == 4 else (*like.shape[1:], 1)))
        self.model = SmallModel(f"{cfg.arch}_{format_input(shape)}", num_threads=cfg.num_threads, low_memory=cfg.low_memory,
                                cache_dir=cache, delegates=cfg.xnnpack)  # fmt: skip
        if cfg.data_source == "store":
            from device_firmware_py.serving.sample_store import SampleStore

            self.store = SampleStore(self.state.dir / "samples", self.model.input_shape, self.model.num_classes,
                                     max_samples=cfg.store_max_samples, max_per_class=cfg.store_max_per_class)  # fmt: skip
            snap = self.store.snapshot()
            self.x, self.y = snap.x, snap.y
        if self.state.model_path.is_file():
            try:
                self.model.load_state(self.state.model_path)
            except (ValueError, OSError, KeyError) as exc:
                log.warning("model state unreadable, starting fresh %s", _kv(error=exc))
        self.model.park()  # low_memory: no interpreter held while idle
        self.runtime_version = RUNTIME
        self._round = self.state.load_round()
        if self.state.int8_path.is_file():
            self._serve_int8(self.state.int8_path.read_bytes())
        elif cfg.serve:  # no int8 model yet: serve the float model of the current weights meanwhile
            self._serve_float()
        self.state.write_modules({"phase": "setup"})
        log.info("agent ready %s", _kv(device=cfg.device_id, model=self.model.manifest.name, samples=self._num_samples(),
                                       data_source=cfg.data_source, round=self._round and self._round.round_id))

    def start_serving(self) -> None:
        """The local endpoint for applications (cfg.serve): predictions, and samples into the store."""
        cfg = self.cfg
        if not cfg.serve or self.api is not None or not (cfg.socket_path or cfg.serve_port):
            return
        from device_firmware_py.serving.local_api import LocalApi

        if cfg.cascade:
            from device_firmware_py.serving.cascade import Cascade

            self.cascade = Cascade(cfg.device_id, lambda t, p: self._client is not None and self._client.publish(t, p, qos=1),
                                   lambda: self._client is not None and self._client.connected.is_set(),
                                   threshold=cfg.cascade_threshold, timeout_s=cfg.cascade_timeout_s)  # fmt: skip
            log.warning("cascade on: inputs the device's model is unsure of (confidence < %s) are sent to the server",
                        cfg.cascade_threshold)  # fmt: skip
        self.api = LocalApi(self.predictor, self.store, socket_path=cfg.socket_path, port=cfg.serve_port,
                            max_request_bytes=cfg.serve_max_request_bytes, max_concurrent=cfg.serve_max_concurrent,
                            on_samples=lambda res: self.events.put(("samples", res)),
                            max_batch=cfg.store_max_samples, cascade=self.cascade).start()  # fmt: skip

    def _num_samples(self) -> int:
        return len(self.store) if self.store is not None else int(len(self.y))

    def _histogram(self) -> list[int]:
        return self.store.histogram() if self.store is not None else label_histogram(self.y, self.model.num_classes)

    # ---------------------------------------------------------------- network
    def _status(self, state: str = "online") -> bytes:
        rs = self._round
        caps: dict[str, Any] = {
            "num_classes": self.model.num_classes,
            "proxy_sha256": self.proxy_digest,
            "proxy_size": int(len(self.proxy_x)),
            "model_version": rs.model_version if rs else 0,
            "rounds_done": rs.rounds_done if rs else 0,
            "pid": os.getpid(),
            "torch_loaded": "torch" in sys.modules,
        }
        rss = peak_rss_mib()
        if rss is not None:
            caps["peak_rss_mib"] = round(rss, 1)
        if self.int8_info:
            caps.update({f"int8_{k}": v for k, v in self.int8_info.items()})
        msg = cm.DeviceStatus(
            device_id=self.cfg.device_id, state=state, arch=self.cfg.arch,
            input_shape=list(self.model.input_shape), runtime_version=self.runtime_version,
            num_samples=self._num_samples(), label_histogram=self._histogram(),
            capabilities=caps,
        )  # fmt: skip
        return codec.encode_control(msg)

    def connect(self) -> None:
        cfg = self.cfg
        offline = codec.encode_control(cm.DeviceStatus(device_id=cfg.device_id, state="offline"))
        self._client = MqttClient(
            cfg.mqtt_client_id,
            host=cfg.host,
            port=cfg.port,
            username=cfg.username or None,
            password=cfg.secret() or None,
            ca_file=cfg.ca_file or None,
            tls=cfg.tls,
            keepalive=cfg.keepalive_s,
            clean_session=False,
            will=Will(topics.device_status(cfg.device_id), offline, qos=1, retain=True),
            on_connect=lambda: self.events.put(("connected", None)),
        )
        self._client.subscribe(topics.device_assign(cfg.device_id), 1, lambda t, p: self.events.put(("assign", (t, p))))
        self._client.subscribe(topics.rounds_current(), 1, lambda t, p: self.events.put(("round", (t, p))))
        self._client.subscribe(topics.device_verdict(cfg.device_id), 1, lambda t, p: self.events.put(("verdict", (t, p))))
        if self.cascade is not None:  # answers are taken on the network thread: the agent thread may be training
            self._client.subscribe(topics.device_predict_answer(cfg.device_id), 1, self.cascade.on_answer)
        self._client.start()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        self.setup()
        self.start_serving()  # before the broker: applications get predictions even while it is away
        self.connect()
        rs = self._round
        if rs is not None and rs.phase == PHASE_ASSIGNED:
            frame = self.state.load_assignment()
            if frame is not None:
                log.info("resuming unfinished assignment %s", _kv(round=rs.round_id))
                self.events.put(("assign", (topics.device_assign(self.cfg.device_id), frame)))
        try:
            while not self._stop.is_set():
                self._housekeeping()
                try:
                    kind, data = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    self._handle(kind, data)
                except ContractError as exc:
                    log.warning("message rejected %s", _kv(kind=kind, reason=exc.reason, detail=exc.detail))
        finally:
            self._shutdown()

    def _housekeeping(self) -> None:
        """Between events: take spooled sample files in, re-announce a changed sample count (at most
        once a second: the server picks participants from the retained status, and a device that
        starts empty must be seen once it holds data)."""
        now = time.monotonic()
        if self.store is not None and self.cfg.spool_dir and now >= self._next_spool:
            from device_firmware_py.serving.spool import scan_spool

            self._next_spool = now + self.cfg.spool_poll_s
            try:
                if any(r["ok"] for r in scan_spool(self.cfg.spool_dir, self.store, self.cfg.spool_keep)):
                    self._status_dirty = True
            except OSError as exc:
                log.warning("spool scan failed %s", _kv(error=exc))
        if self._status_dirty and self._client is not None and now - self._last_status >= 1.0:
            self._publish_status()

    def _publish_status(self) -> None:
        self._status_dirty = False
        self._last_status = time.monotonic()
        self._client.publish(topics.device_status(self.cfg.device_id), self._status(), qos=1, retain=True)

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self._client is not None:
            try:  # a clean exit says offline itself; the Last Will covers crashes
                self._client.publish(topics.device_status(self.cfg.device_id), self._status("offline"), qos=1, retain=True,
                                     wait_s=2.0)
            except (RuntimeError, ValueError) as exc:  # broker gone: the retained Last Will says it anyway
                log.info("offline status not sent %s", _kv(error=exc))
            finally:
                self._client.stop()
                self._client = None

    def _handle(self, kind: str, data: Any) -> None:
        if kind == "connected":
            self._publish_status()
            self._published_result_for = None  # an unacknowledged result is re-sent once per connection
        elif kind == "assign":
            self._on_assign(*data)
        elif kind == "round":
            self._on_round(*data)
        elif kind == "verdict":
            self._on_verdict(*data)
        elif kind == "samples":  # the application added samples: the server should see the new count
            self._status_dirty = True

    # -------------------------------------------------------------- handlers
    def _on_round(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        _, msg = codec.decode_for_topic(topic, payload)
        assert isinstance(msg, cm.RoundStatus)  # decode_for_topic checked the topic's message type
        rs = self._round
        if rs is not None and rs.phase == PHASE_DONE and msg.round_id == rs.round_id and msg.state == "collecting":
            self._republish_result("round still collecting")

    def _on_verdict(self, topic: str, payload: bytes) -> None:
        """The server's decision on a result we sent: logged (a refusal with its reason). When it
        says the server holds our result (accepted / duplicate), the round is marked confirmed so
        that reconnects stop re-uploading it: on a flapping link every reconnect used to send the
        whole result again until the round closed, and past the server's per-round message limit
        an accepted result drew `rate_limited` rejections."""
        _, v = codec.decode_for_topic(topic, payload)
        assert isinstance(v, cm.ResultVerdict)  # decode_for_topic checked the topic's message type
        self.last_verdict = {"round": v.round_id, "status": v.status, "reason": v.reason}
        if v.status in ("rejected", "late"):
            log.warning("result refused by the server %s", _kv(round=v.round_id, status=v.status, reason=v.reason))
        else:
            log.info("result verdict %s", _kv(round=v.round_id, status=v.status))
        rs = self._round
        if (v.status in ("accepted", "duplicate") and rs is not None and rs.phase == PHASE_DONE
                and v.round_id == rs.round_id and not rs.confirmed):  # fmt: skip
            rs.confirmed = True
            self.state.save_round(rs)

    def _republish_result(self, why: str) -> None:
        rs = self._round
        if rs is None or self._published_result_for == rs.round_id:
            return
        if rs.confirmed:
            log.info("result not re-published %s", _kv(round=rs.round_id, why="server_confirmed_it"))
            self._published_result_for = rs.round_id  # once per connection is enough to say so
            return
        frame = self.state.load_result()
        if frame is None:
            return
        log.info("re-publishing result %s", _kv(round=rs.round_id, why=why.replace(" ", "_")))
        self._client.publish(topics.device_result(self.cfg.device_id), frame, qos=1)
        self._published_result_for = rs.round_id

    def _on_assign(self, topic: str, frame: bytes) -> None:
        _, msg = codec.decode_for_topic(topic, frame)
        assert isinstance(msg, cm.Assignment)  # decode_for_topic checked the topic's message type
        rs = self._round
        if rs is not None and msg.round_id == rs.round_id and rs.phase == PHASE_DONE:
            self._published_result_for = None
            if rs.confirmed:  # the server asks again: whatever it said before, it wants the result
                rs.confirmed = False
                self.state.save_round(rs)
            self._republish_result("assignment repeated")  # server restarted or lost our result
            return
        if rs is not None and msg.round_id < rs.round_id:
            log.info("stale assignment ignored %s", _kv(round=msg.round_id, current=rs.round_id))
            return
        if msg.proxy_digest and msg.proxy_digest != self.proxy_digest:
            log.error("assignment refused %s", _kv(round=msg.round_id, reason="proxy_digest_mismatch"))
            return
        self.state.save_assignment(frame)
        done = rs.rounds_done if rs else 0
        self._round = RoundState(msg.round_id, PHASE_ASSIGNED, msg.model_version, done)
        self.state.save_round(self._round)
        self._execute(msg)

    def _progress(self, round_id: int, phase: str, step: int = 0, total: int | None = None, loss: float | None = None) -> None:
        if loss is not None and not math.isfinite(loss):
            loss = None
        msg = cm.Progress(device_id=self.cfg.device_id, round_id=round_id, phase=phase, step=step, total=total, loss=loss)
        self._client.publish(topics.device_progress(self.cfg.device_id), codec.encode_control(msg), qos=0)

    def _step_progress(self, round_id: int) -> Any:
        """progress(phase, step, total, loss) for execute_assignment: at most one message per
        `progress_interval_s` (QoS 0), so a slow device is told from a dead one without flooding
        the link. The agent's own milestones (start, uploaded, quantize, done) are sent besides."""
        interval = self.cfg.progress_interval_s
        last = [time.monotonic()]  # the "start" milestone was just sent

        def report(phase: str, step: int, total: int, loss: float | None) -> None:
            now = time.monotonic()
            if now - last[0] < interval:
                return
            last[0] = now
            self._progress(round_id, phase, step, total, loss)

        return report

    def _execute(self, msg: cm.Assignment) -> None:
        a = msg
        log.info("assignment %s", _kv(round=a.round_id, task=a.plan.task, teacher=a.teacher_logits is not None,
                                      weights=a.weights is not None,
                                      proxy_rows="all" if a.proxy_indices is None else len(a.proxy_indices)))
        if self.store is not None:  # this round trains on what the store holds now; later adds wait
            snap = self.store.snapshot()
            self.x, self.y = snap.x, snap.y
            if len(snap) == 0:  # nothing to train on, and a result must count >= 1 sample: no result
                log.warning("assignment skipped %s", _kv(round=a.round_id, reason="no_samples_in_store"))
                self._progress(a.round_id, "skipped_no_samples", 0, 0)
                self._publish_status()
                return
        self._progress(a.round_id, "start", 0, 3)
        if self.cfg.low_memory and not self.cfg.serve and self.int8 is not None:  # the int8 model waits out the round
            from device_firmware_py.runtime import cmalloc

            self.predictor.clear()
            cmalloc.trim()
        t0 = time.perf_counter()
        try:
            result = execute_assignment(self.model, self.x, self.y, self.proxy_x, a, proxy_digest=self.proxy_digest,
                                        progress=self._step_progress(a.round_id))  # fmt: skip
        except BaseException:
            self._restore_int8()
            raise
        result.metrics["t_device_s"] = time.perf_counter() - t0
        if self.test is not None:  # held-out accuracy of the float model, for the operator's table
            result.metrics["test_acc"] = self.model.evaluate(*self.test)
        result.metrics = cm.metrics_clean(result.metrics)
        frame = codec.encode_frame(result, logits_dtype=a.plan.logits_dtype)  # the dtype the server asked for
        # Persist before publishing: a crash after this point re-publishes instead of retraining.
        self.model.save_state(self.state.model_path)
        self.state.save_result(frame)
        self._round = RoundState(a.round_id, PHASE_DONE, msg.model_version, (self._round.rounds_done if self._round else 0) + 1)
        self.state.save_round(self._round)
        self._client.publish(topics.device_result(self.cfg.device_id), frame, qos=1)
        self._published_result_for = a.round_id
        self._progress(a.round_id, "uploaded", 2, 3, result.metrics.get("train_loss"))
        log.info("result published %s", _kv(round=a.round_id, bytes=len(frame), t_device_s=round(result.metrics["t_device_s"], 3),
                                            local_acc=result.metrics.get("local_acc")))
        if self.cfg.quantize:
            self._progress(a.round_id, "quantize", 2, 3)
            self._requantize(a.round_id, msg.model_version)
        elif self.cfg.serve:  # no quantizer: serve the float model of the new weights
            self._serve_float(a.round_id, msg.model_version)
        self._restore_int8()
        self._progress(a.round_id, "done", 3, 3)
        self._publish_status()
        self.state.write_modules({"phase": "round", "round_id": a.round_id})

    # ------------------------------------------------------------ inference
    def _requantize(self, round_id: int | None = None, model_version: int | None = None) -> None:
        """Re-quantize the int8 inference model from the trained weights, then serve with it."""
        t0 = time.perf_counter()
        child: dict[str, Any] = {}
        try:
            if self.cfg.quantize_isolated:  # ai-edge-quantizer's import + calibration peak lives in a child
                weights = reopen = None
                if self.cfg.release_before_quantize and self.model.low_memory:
                    self.model.park()  # interpreter closed; weights and Adam state kept for the next round
                    weights = self.model.get_weights()
                elif self.cfg.release_before_quantize:
                    weights = reopen = self.model.release()  # Adam restarts on reopen
                try:
                    blob, child = self.model.quantize_int8_isolated(self.x, self.state.dir, max_samples=self.cfg.calibration_samples,
                                                                    weights=weights)  # fmt: skip
                finally:
                    if reopen is not None:
                        self.model.reopen(reopen)
            else:
                blob = self.model.quantize_int8(self.x, max_samples=self.cfg.calibration_samples)
        except Exception as exc:  # quantizer failure must not kill the device: keep the old model
            log.error("int8 re-quantization failed %s", _kv(error=repr(exc)))
            return
        self.state.save_int8(blob)
        self._serve_int8(blob, round_id, model_version)
        self.int8_info["t_quantize_s"] = round(time.perf_counter() - t0, 3)
        if child.get("child_peak_rss_mib") is not None:
            self.int8_info["child_peak_rss_mib"] = round(float(child["child_peak_rss_mib"]), 1)

    @property
    def int8(self) -> Any:
        """The served int8 model (`model(x) -> logits`), None while none is served."""
        m = self.predictor.current
        return m if m is not None and m.info.kind == "int8" else None

    def _restore_int8(self) -> None:
        """Serve the saved int8 model again if none is served (low_memory drops it during a round)."""
        if self.predictor.current is None and self.state.int8_path.is_file():
            self._serve_int8(self.state.int8_path.read_bytes())

    def _serve_int8(self, blob: bytes, round_id: int | None = None, model_version: int | None = None) -> None:
        """Load `blob` completely, then swap it in for the applications (serving.Predictor)."""
        rs = self._round
        if round_id is None and rs is not None and rs.phase == PHASE_DONE:  # restored at start: the last round's
            round_id, model_version = rs.round_id, rs.model_version
        served = self.predictor.load(blob, kind="int8", round_id=round_id, model_version=model_version)
        x, y = self.test if self.test is not None else (self.x[:512], self.y[:512])
        acc = float(np.mean(served(x).argmax(1) == y)) if len(y) else 0.0
        self.int8_info = {"bytes": len(blob), "serial": served.info.serial,
                          "test_acc" if self.test is not None else "local_acc": round(acc, 4)}  # fmt: skip

    def _serve_float(self, round_id: int | None = None, model_version: int | None = None) -> None:
        """Serve the float inference model of the current weights (numpy patch, no quantizer): what a
        device answers before its first int8 model, or with quantize = false."""
        try:
            blob = self.model.float_inference_model()
            self.predictor.load(blob, kind="float", round_id=round_id, model_version=model_version)
        except (ValueError, OSError, RuntimeError) as exc:  # serving is a service, never the agent's death
            log.error("float model not served %s", _kv(error=repr(exc)))

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Class predictions from the model the device serves (the training model until one exists)."""
        m = self.predictor.current
        logits = m(x) if m is not None else self.model.logits(x)
        return logits.argmax(1)
