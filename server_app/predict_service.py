"""PredictService: answers the devices' cascade requests (devices/<id>/up/predict) with the large model.

Isolation: a third MQTT connection of its own (besides the results link and the telemetry link), so
a burst of predict requests never queues in front of results, status or progress at the broker or on
a network thread. On that connection's network thread a request costs the device's `predict` budget
check (server_app/ingest_budget.py: over budget -> dropped before decoding, counted, quarantine as
for any flood) and a put into a bounded queue (full -> dropped); one worker thread decodes it (the
topic's device id must be the payload's: `decode_for_topic`), runs the LargePredictor and publishes
the PredictAnswer on that device's down/predict (QoS 1). The broker's ACL lets each device publish
only its own up/predict and read only its own down/#, so a device never sees another's answers.

Only leading servers (roles all | orchestrator) run it: one answer per request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
from typing import Any

import numpy as np

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.errors import ContractError
from device_firmware_py.mqtt import MqttClient
from server_app.ingest_budget import DeviceBudget, topic_device
from server_app.models.predictor import LargePredictor, NoLargeModel, PredictInputError

log = logging.getLogger("koala.predict")
QUEUE_MAX = 256


class PredictService:
    def __init__(self, predictor: LargePredictor, budget: DeviceBudget | None, *, host: str, port: int,
                 username: str | None = None, password: str | None = None, tls: bool = False,
                 ca_file: str | None = None, client_id: str = "koala-server", queue_max: int = QUEUE_MAX) -> None:  # fmt: skip
        self.predictor, self.budget = predictor, budget
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=queue_max)
        self.link = MqttClient(f"{client_id}-predict-{os.getpid()}-{secrets.token_hex(3)}", host, port, username=username,
                               password=password, tls=tls, ca_file=ca_file, clean_session=True)  # fmt: skip
        self._thread: threading.Thread | None = None
        self.answered = 0
        self.dropped = 0  # over budget or queue full
        self.refused = 0  # undecodable / not fitting the model

    def start(self, wait_s: float = 15.0) -> PredictService:
        self._thread = threading.Thread(target=self._work, name="koala-predict", daemon=True)
        self._thread.start()
        self.link.subscribe(topics.filter_predict_requests(), 1, self._on_request)
        if not self.link.start(wait_s=wait_s):
            self.stop()
            raise RuntimeError(f"predict connection refused: {self.link.last_error or 'no answer'}")
        return self

    def stop(self) -> None:
        self.link.stop()
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread.join(5)
            self._thread = None

    # ------------------------------------------------------------------ network thread
    def _on_request(self, topic: str, payload: bytes) -> None:
        if self.budget is not None and not self.budget.allow("predict", topic_device(topic)):
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((topic, bytes(payload)))
        except queue.Full:
            self.dropped += 1

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._answer(*item)
            except Exception:  # one bad request must not end the service
                log.exception("predict request failed")

    def _answer(self, topic: str, payload: bytes) -> None:
        try:
            parsed, req = codec.decode_for_topic(topic, payload)
        except ContractError as exc:
            self.refused += 1
            log.info("predict request refused topic=%s reason=%s detail=%s", topic, exc.reason, exc.detail)
            return
        if parsed.kind != "predict_request":
            return
        dev = parsed.device_id
        assert dev is not None and isinstance(req, cm.PredictRequest)
        try:
            p = self.predictor.predict(req.array())
            ans = cm.PredictAnswer(device_id=dev, request_id=req.request_id, status="ok", classes=p.classes.tolist(),
                                   probabilities=np.round(np.clip(p.probabilities, 0.0, 1.0), 6).tolist(),
                                   model_version=p.version)  # fmt: skip
        except PredictInputError as exc:
            self.refused += 1
            ans = cm.PredictAnswer(device_id=dev, request_id=req.request_id, status="refused", reason=str(exc)[:1000])
        except NoLargeModel as exc:
            ans = cm.PredictAnswer(device_id=dev, request_id=req.request_id, status="unavailable", reason=str(exc)[:1000])
        self.link.publish(topics.device_predict_answer(dev), codec.encode_control(ans), 1, False)
        self.answered += 1

    def stats(self) -> dict[str, Any]:
        return {"answered": self.answered, "dropped": self.dropped, "refused": self.refused,
                "queued": self._queue.qsize()}  # fmt: skip
