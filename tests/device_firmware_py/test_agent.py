"""The device agent as its own OS process against a private Mosquitto.

Proves: retained status announcement with capabilities and the Last Will (kill -9 -> offline);
no torch/tensorflow in the agent process; a finished-but-unacknowledged result is re-published
after a crash (same bytes: no retraining) while the round still collects; an unfinished
assignment on disk is redone at start; a malformed assignment is refused without a crash.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.plan import TrainingPlan
from device_firmware_py.mqtt import MqttClient
from device_firmware_py.task import Assignment

pytestmark = pytest.mark.mosquitto
DEV = "dev000"


def _wait(pred: Any, timeout_s: float = 60.0, what: str = "condition") -> None:
    t_end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def fleet(tmp_path, mosquitto_broker):
    from server_app.demo.fleet_data import prepare_fleet

    layout = prepare_fleet(tmp_path, dataset="digits", devices=1, proxy_size=64, broker_url=mosquitto_broker.url)
    cfg = Path(layout.devices[0]["config_path"])
    c = json.loads(cfg.read_text())
    c["client_id"] = f"koala-dev-{secrets.token_hex(3)}"  # the broker fixture is shared by the module
    c["quantize"] = False  # int8 re-quantization is covered by the e2e tests; keep this one quick
    cfg.write_text(json.dumps(c))
    got: dict[str, list[bytes]] = {}
    mon = MqttClient(f"mon-{secrets.token_hex(3)}", mosquitto_broker.host, mosquitto_broker.port, clean_session=True)
    mon.subscribe(f"{topics.PREFIX}/devices/{DEV}/#", 1, lambda t, p: got.setdefault(t, []).append(p))
    assert mon.start(wait_s=10)
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "device_firmware_py.cli", "run", "--config", str(cfg)],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        procs.append(p)
        return p

    yield layout, cfg, mon, got, start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    mon.client.publish(topics.rounds_current(), b"", qos=1, retain=True)  # clear what this test retained
    mon.client.publish(topics.device_status(DEV), b"", qos=1, retain=True)
    mon.stop()


def _status(got: dict[str, list[bytes]]) -> cm.DeviceStatus | None:
    ps = [p for p in got.get(topics.device_status(DEV), []) if p]
    return codec.decode(ps[-1]) if ps else None  # type: ignore[return-value]


def _assignment(layout: Any, round_id: int) -> bytes:
    teacher = np.random.default_rng(round_id).normal(size=(layout.proxy_size, 10)).astype(np.float32)
    plan = TrainingPlan(upload=("logits",), local_epochs=1, logits_dtype="int8")
    a = Assignment(round_id, DEV, "cnn_small", plan=plan, teacher_logits=teacher,
                   proxy_digest=layout.proxy_sha256, deadline=time.time() + 120)  # fmt: skip
    return codec.encode_frame(a)


def test_status_lastwill_and_no_torch(fleet):
    layout, cfg, mon, got, start = fleet
    p = start()
    _wait(lambda: _status(got) is not None and _status(got).state == "online", what="online status")
    st = _status(got)
    assert st.arch == "cnn_small" and st.num_samples == layout.devices[0]["n"] and sum(st.label_histogram) == st.num_samples
    assert st.runtime_version and st.capabilities["proxy_sha256"] == layout.proxy_sha256
    assert st.capabilities["torch_loaded"] is False
    info = json.loads((cfg.parent / "state" / "modules.json").read_text())
    assert info["pid"] == p.pid and info["torch"] is False and info["tensorflow"] is False
    assert "server_app" not in info["modules"]
    p.send_signal(signal.SIGKILL)
    p.wait()
    _wait(lambda: _status(got).state == "offline", what="Last Will offline")


def test_result_republished_after_crash_without_retraining(fleet):
    layout, cfg, mon, got, start = fleet
    collecting = codec.encode_control(cm.RoundStatus(round_id=0, state="collecting"))
    mon.publish(topics.rounds_current(), collecting, 1, retain=True)
    p = start()
    _wait(lambda: _status(got) is not None and _status(got).state == "online", what="online status")
    mon.publish(topics.device_assign(DEV), _assignment(layout, 0), 1)
    rt = topics.device_result(DEV)
    _wait(lambda: len(got.get(rt, [])) >= 1, what="result")
    first = got[rt][0]
    res = codec.decode_for_topic(rt, first)[1]
    assert res.round_id == 0 and res.proxy_logits.shape == (layout.proxy_size, 10)
    assert res.proxy_digest == layout.proxy_sha256 and {"t_device_s", "test_acc"} <= set(res.metrics)
    # uploaded in the wire dtype the plan asked for: int8, one byte per logit + its scale
    (desc,) = codec.peek_header(first)["tensors"]
    assert desc["dtype"] == "int8" and desc["scale"] > 0 and desc["shape"] == [layout.proxy_size, 10]
    p.send_signal(signal.SIGKILL)  # crash before the server "acknowledged" (round still collecting)
    p.wait()
    start()
    _wait(lambda: len(got.get(rt, [])) >= 2, what="re-published result")
    assert got[rt][1] == first  # byte-identical: re-sent from disk, not retrained
    log = (cfg.parent.parent.parent / "agent.log").read_text()
    assert log.count("assignment round=0") == 1 and "re-publishing result round=0" in log


def test_confirmed_result_not_reuploaded_on_reconnect(fleet, mosquitto_broker):
    """Once the server's verdict says it holds the result, a reconnect (link cut) while the round
    still collects no longer re-uploads it (a flapping link used to send it again on every
    reconnect, and past 8 messages an accepted result drew `rate_limited` rejections); a repeated
    assignment -- the server asking again -- still gets the same bytes."""
    from bench.link_fault import LinkFaultProxy

    layout, cfg, mon, got, start = fleet
    link = LinkFaultProxy(mosquitto_broker.host, mosquitto_broker.port).start()
    try:
        c = json.loads(cfg.read_text())
        c["broker_url"] = link.url
        cfg.write_text(json.dumps(c))
        collecting = codec.encode_control(cm.RoundStatus(round_id=0, state="collecting"))
        mon.publish(topics.rounds_current(), collecting, 1, retain=True)
        start()
        _wait(lambda: _status(got) is not None and _status(got).state == "online", what="online status")
        mon.publish(topics.device_assign(DEV), _assignment(layout, 0), 1)
        rt = topics.device_result(DEV)
        _wait(lambda: len(got.get(rt, [])) >= 1, what="result")
        verdict = cm.ResultVerdict(device_id=DEV, status="accepted", round_id=0)
        mon.publish(topics.device_verdict(DEV), codec.encode_control(verdict), 1)
        round_file = cfg.parent / "state" / "round.json"
        _wait(lambda: json.loads(round_file.read_text()).get("confirmed") is True, what="round confirmed on disk")
        log_path = cfg.parents[2] / "agent.log"
        assert link.cut() == 1
        decided = ("result not re-published round=0 why=server_confirmed_it", "re-publishing result round=0")
        _wait(lambda: any(d in log_path.read_text() for d in decided), what="the reconnected agent's decision")
        assert decided[0] in log_path.read_text() and decided[1] not in log_path.read_text()
        assert len(got[rt]) == 1 and link.stats().connections == 2
        mon.publish(topics.device_assign(DEV), _assignment(layout, 0), 1)  # the server asks again
        _wait(lambda: len(got.get(rt, [])) >= 2, what="result re-sent on a repeated assignment")
        assert got[rt][1] == got[rt][0]
    finally:
        link.close()


def test_unfinished_assignment_redone_and_garbage_refused(fleet):
    from device_firmware_py.agent.state import AgentState, RoundState

    layout, cfg, mon, got, start = fleet
    st = AgentState(cfg.parent / "state")
    st.save_assignment(_assignment(layout, 5))  # as if the device died mid-training in round 5
    st.save_round(RoundState(5, "assigned"))
    start()
    rt = topics.device_result(DEV)
    _wait(lambda: len(got.get(rt, [])) >= 1, what="redone result")
    assert codec.decode(got[rt][0]).round_id == 5
    mon.publish(topics.device_assign(DEV), b"KOAL garbage", 1)
    mon.publish(topics.device_assign(DEV), _assignment(layout, 6), 1)  # still alive and working
    _wait(lambda: len(got.get(rt, [])) >= 2, what="result after garbage")
    assert codec.decode(got[rt][1]).round_id == 6
