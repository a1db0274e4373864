"""RoundOrchestrator through ServerServices on a real Mosquitto and a real registry.

A restarted server resumes the round it was collecting: what was accepted before the restart is
kept (not re-asked), only the missing device gets the assignment again, the round completes, and
the next round starts from the saved large model. Device d1 is the real DeviceAgent (LiteRT), d2
a scripted MQTT client that stays silent until told to answer (a slow device).
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import numpy as np
import pytest

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.mqtt import MqttClient

pytestmark = pytest.mark.mosquitto


def _wait(pred: Any, timeout_s: float = 90.0, what: str = "condition") -> None:
    t_end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class ScriptedDevice:
    """A device that announces itself and answers assignments with well-formed logits once `answer` is set."""

    def __init__(self, device_id: str, broker: Any, num_samples: int = 50):
        self.id = device_id
        self.answer = threading.Event()
        self.assignments: list[int] = []
        offline = codec.encode_control(cm.DeviceStatus(device_id=device_id, state="offline"))
        self.link = MqttClient(f"scripted-{secrets.token_hex(3)}", broker.host, broker.port, clean_session=True,
                             will=None)  # fmt: skip
        self._offline = offline
        self.link.subscribe(topics.device_assign(device_id), 1, self._on_assign)
        assert self.link.start(wait_s=10)
        status = cm.DeviceStatus(device_id=device_id, arch="cnn_small", input_shape=[8, 8, 1], num_samples=num_samples,
                                 label_histogram=[5] * 10)  # fmt: skip
        self.link.publish(topics.device_status(device_id), codec.encode_control(status), 1, True)

    def _on_assign(self, topic: str, payload: bytes) -> None:
        a = codec.decode_for_topic(topic, payload)[1]
        self.assignments.append(a.round_id)
        threading.Thread(target=self._reply, args=(a,), daemon=True).start()

    def _reply(self, a: cm.Assignment) -> None:
        self.answer.wait()
        rows = len(a.proxy_indices) if a.proxy_indices is not None else self.p  # type: ignore[attr-defined]
        # an honest-looking answer: the teacher's view where there is one (pure noise would make the
        # model gate reject the round as a collapse, which is not what this test is about)
        noise = np.random.default_rng(a.round_id).normal(size=(rows, 10)).astype(np.float32)
        logits = noise if a.teacher_logits is None else a.teacher_logits + 0.1 * noise
        r = cm.Result(round_id=a.round_id, device_id=self.id, arch=a.arch, num_samples=50, model_version=a.model_version,
                      label_histogram=[5] * 10, proxy_digest=a.proxy_digest, proxy_logits=logits,
                      metrics={"t_device_s": 0.01})  # fmt: skip
        self.link.publish(topics.device_result(self.id), codec.encode_frame(r), 1)

    def close(self) -> None:
        self.link.publish(topics.device_status(self.id), self._offline, 1, True, wait_s=2)
        self.link.stop()


def test_restarted_server_resumes_collecting_round(db_url, mosquitto_broker, tmp_path):
    from device_firmware_py.agent.agent import DeviceAgent
    from device_firmware_py.config import DeviceConfig
    from server_app.demo.fleet_data import prepare_fleet
    from server_app.registry import crud
    from server_app.services import ServerOptions, ServerServices

    layout = prepare_fleet(tmp_path, dataset="digits", devices=1, proxy_size=64, broker_url=mosquitto_broker.url,
                           device_overrides={"quantize": False, "client_id": f"koala-dev-{secrets.token_hex(3)}"})  # fmt: skip
    opts = dict(db_url=db_url, data_dir=str(tmp_path / "server"), proxy_path=layout.proxy_path, test_path=layout.test_path,
                broker_host=mosquitto_broker.host, broker_port=mosquitto_broker.port,
                policy={"strategy": "koala_homo", "teacher": "device_logits", "rkd_epochs": 2,
                        "large": {"width": 8, "options": {"fc": 64}}, "rounds": 2, "deadline_s": 120.0,
                        "min_devices": 2, "quorum_fraction": 1.0},
                eval_samples=100, torch_threads=1)  # fmt: skip
    agent = DeviceAgent(DeviceConfig.load(layout.devices[0]["config_path"]))
    agent_thread = threading.Thread(target=agent.run, daemon=True)
    agent_thread.start()
    slow = ScriptedDevice("dev-slow", mosquitto_broker)
    p = layout.proxy_size
    slow.p = p  # type: ignore[attr-defined]
    a = ServerServices(ServerOptions(**opts))
    b = None
    try:
        a.start()
        reg = a.registry
        _wait(lambda: reg.run(crud.list_assignments, round_id=0, status="accepted"), what="dev000 accepted in round 0")
        assert slow.assignments == [0]
        a.stop()  # server goes down mid-collection: the round stays open in the DB
        assert reg is not None
        b = ServerServices(ServerOptions(**opts))
        b.start()
        assert b.registry.run(crud.get_round, 0).state == "collecting"
        _wait(lambda: slow.assignments == [0, 0], what="missing device re-assigned")
        slow.answer.set()
        assert b.orchestrator.wait_finished(180), b.orchestrator.state
        r0 = b.registry.run(crud.get_round, 0)
        assert r0.state == "completed" and r0.metrics["accepted"] == 2
        assert agent._round.round_id == 1 and agent._round.rounds_done == 2  # dev000 trained once per round
        rep0 = next(r for r in b.orchestrator.reports if r.round_id == 0)
        assert rep0.num_results == 2
        assert b.registry.run(crud.get_round, 1).state == "completed"
        versions = b.registry.run(crud.list_model_versions, kind="large")
        assert sorted(v.version for v in versions) == [0, 1, 2]  # v0: the initial model
    finally:
        agent.stop()
        agent_thread.join(30)
        slow.close()
        for s in (a, b):
            if s is not None and s.started:
                s.stop()
