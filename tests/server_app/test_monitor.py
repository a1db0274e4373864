"""`koala monitor` against a live private Mosquitto with real contract messages published by paho.

The monitor runs as a real `koala monitor` process; messages are encoded by the contract codec, so
what it prints is what an operator sees on a real fleet.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from server_app.monitor import describe, format_line, subscriptions

pytestmark = pytest.mark.mosquitto


def _result(device: str = "dev1", rnd: int = 3) -> cm.Result:
    rng = np.random.default_rng(0)
    return cm.Result(
        round_id=rnd, device_id=device, arch="cnn_small", num_samples=300,
        proxy_logits=rng.normal(size=(200, 10)).astype(np.float32),
        weights=[rng.normal(size=(3, 3, 1, 8)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32)],
        metrics={"test_acc": 0.8},
    )  # fmt: skip


def test_subscriptions_come_from_the_contract():
    subs = dict(subscriptions())
    assert subs[topics.filter_device_status()] == 1
    assert subs[topics.filter_rounds()] == 1
    assert subs[topics.filter_results()] == 1
    assert subs[topics.filter_progress()] == 0
    assert dict(subscriptions(["all"])) == {topics.filter_everything(): 1}
    assert dict(subscriptions(["koala/v1/devices/x/#"])) == {"koala/v1/devices/x/#": 1}
    with pytest.raises(ValueError):
        subscriptions(["bogus"])


def test_result_frames_are_summarised_never_dumped():
    res = _result()
    payload = codec.encode(res)
    rec = describe(topics.device_result("dev1"), payload)
    assert rec["kind"] == "result" and rec["device_id"] == "dev1" and rec["round_id"] == 3
    assert rec["bytes"] == len(payload)
    assert [t["shape"] for t in rec["tensors"]][:1] == [[200, 10]]
    line = format_line(rec)
    assert "dev1 round 3" in line and "proxy_logits:float16[200,10]" in line and f"{len(payload)} B" in line
    assert len(line) < 300
    assert len(json.dumps(rec)) < 2000  # header only, no tensor values
    bad = describe(topics.device_result("dev1"), payload[:-1] + b"\x00")
    assert bad["invalid"] == "bad_digest" and "INVALID bad_digest" in format_line(bad)
    assert describe("other/topic", b"x")["kind"] == "foreign"
    assert describe(topics.round_status(4), b"")["cleared"] is True


def _monitor(broker_url: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "server_app.cli", "monitor", "--broker", broker_url, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-publisher")
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _publish_fleet_traffic(c: mqtt.Client) -> bytes:
    def pub(t: str, p: bytes, retain: bool = False) -> None:
        c.publish(t, p, qos=1, retain=retain).wait_for_publish(5)

    result = codec.encode(_result())
    pub(topics.device_status("dev1"), codec.encode(cm.DeviceStatus("dev1", "online", arch="cnn_small", num_samples=300)), True)
    pub(topics.round_status(3), codec.encode(cm.RoundStatus(3, "collecting", strategy="koala_homo", participants=["dev1", "dev2"], received=1, accepted=1)), True)  # fmt: skip
    pub(topics.device_progress("dev1"), codec.encode(cm.Progress("dev1", 3, "train", step=5, total=10, loss=0.42)))
    pub(topics.device_result("dev1"), result)
    pub(topics.device_result("dev2"), codec.encode(_result("dev1")))  # spoofed: dev1's payload on dev2's topic
    pub(topics.device_status("dev1"), codec.encode(cm.DeviceStatus("dev1", "offline")), True)
    return result


def _wait_subscribed(port: int) -> None:
    """Publish a retained server status: a monitor receives it right after subscribing, so its first
    output line proves it is subscribed (no sleeps, no timing assumptions)."""
    c = _publisher(port)
    c.publish(topics.server_status(), codec.encode(cm.ServerStatus("online", version="test")), qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def test_monitor_json_against_live_mosquitto(mosquitto_broker):
    port = mosquitto_broker.port
    _wait_subscribed(port)
    mon = _monitor(mosquitto_broker.url, "--json", "--count", "7", "--timeout", "60")
    try:
        # the retained server status is the monitor's first line: it is subscribed after that
        first = json.loads(mon.stdout.readline())
        assert first["kind"] == "server_status" and first["retained"] is True and first["state"] == "online"
        c = _publisher(port)
        result = _publish_fleet_traffic(c)
        out, err = mon.communicate(timeout=60)
        c.loop_stop()
        c.disconnect()
    finally:
        if mon.poll() is None:
            mon.kill()
    recs = [json.loads(line) for line in out.splitlines()]
    assert mon.returncode == 0, err
    kinds = [r["kind"] for r in recs]
    assert kinds == ["device_status", "round_status", "progress", "result", "result", "device_status"]
    status, rnd, prog, res, spoofed, offline = recs
    assert status["device_id"] == "dev1" and status["state"] == "online" and status["arch"] == "cnn_small"
    assert rnd["round_id"] == 3 and rnd["state"] == "collecting" and rnd["participants"] == ["dev1", "dev2"]
    assert prog["phase"] == "train" and prog["loss"] == pytest.approx(0.42)
    assert res["bytes"] == len(result) and res["tensors"][0] == {"name": "proxy_logits", "dtype": "float16", "shape": [200, 10]}
    assert len(res["tensors"]) == 3 and res["num_samples"] == 300
    assert spoofed["device_id"] == "dev2" and spoofed["invalid"] == "spoofed_device"  # the topic is authoritative
    assert offline["state"] == "offline"


def test_monitor_text_lines_with_topic_filter(mosquitto_broker):
    import signal

    port = mosquitto_broker.port
    _wait_subscribed(port)
    mon = _monitor(mosquitto_broker.url, "--topics", "rounds", "server", "--timeout", "60")
    lines: list[str] = []
    try:
        # retained state arrives first (server status, maybe rounds of other tests); wait for ours
        while "server" not in (line := mon.stdout.readline()):
            assert line, "monitor ended early"
            lines.append(line.rstrip("\n"))
        lines.append(line.rstrip("\n"))
        c = _publisher(port)
        c.publish(topics.device_progress("dev1"), codec.encode(cm.Progress("dev1", 55, "distill")), qos=1).wait_for_publish(5)
        for state in ("aggregating", "completed"):
            msg = cm.RoundStatus(55, state, strategy="koala_homo", participants=["dev1"], received=1, accepted=1,
                                 metrics={"large_test_acc": 0.8125} if state == "completed" else {})  # fmt: skip
            c.publish(topics.round_status(55), codec.encode(msg), qos=1).wait_for_publish(5)
        while "55 completed" not in (line := mon.stdout.readline()):
            assert line, "monitor ended early"
            lines.append(line.rstrip("\n"))
        lines.append(line.rstrip("\n"))
        mon.send_signal(signal.SIGINT)  # Ctrl-C ends it cleanly
        _, err = mon.communicate(timeout=30)
        c.loop_stop()
        c.disconnect()
    finally:
        if mon.poll() is None:
            mon.kill()
    assert mon.returncode == 0, err
    # issue 29: it says which broker it joined (and as whom), and Ctrl-C says it is stopping
    assert f"# joined mqtt://127.0.0.1:{port} as koala-monitor-" in err and topics.filter_rounds() in err
    assert "stopping (Ctrl-C again to force)..." in err
    assert not any("progress" in ln or "55 distill" in ln for ln in lines)
    ours = [ln[12:] for ln in lines if "round         55 " in ln]
    assert ours == [
        "   round         55 aggregating received=1/1 accepted=1 rejected=0",
        "   round         55 completed received=1/1 accepted=1 rejected=0 large_acc=0.8125",
    ]
    assert any(ln[12:].startswith(" R server        online") for ln in lines)


def test_monitor_reports_an_unreachable_broker():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    mon = _monitor(f"mqtt://127.0.0.1:{port}", "--timeout", "1.5")
    out, err = mon.communicate(timeout=30)
    assert mon.returncode == 1 and "could not connect" in err and out == ""


def test_monitor_warns_on_a_broker_without_koala_traffic(tmp_path):
    """Issue 29: `koala monitor` on an unrelated broker printed nothing and exited 0. It now says which
    broker it joined and warns when no KOALA message arrives (a KOALA server keeps a retained status)."""
    from server_app.transport.broker import MosquittoBroker, find_mosquitto_binary

    if find_mosquitto_binary() is None:
        pytest.skip("mosquitto binary not installed")
    b = MosquittoBroker(workdir=tmp_path / "quiet").start()  # a broker no KOALA server ever used
    try:
        mon = _monitor(b.url, "--quiet-warn", "1", "--timeout", "3")
        out, err = mon.communicate(timeout=30)
    finally:
        b.stop()
    assert mon.returncode == 0 and out == "", err
    assert f"# joined mqtt://127.0.0.1:{b.port} as koala-monitor-" in err, err
    assert f"no KOALA traffic seen on mqtt://127.0.0.1:{b.port} in 1 s: is this the right broker?" in err, err
    assert "--run-dir" in err


def test_monitor_run_dir_joins_the_demos_broker(mosquitto_broker, tmp_path):
    """--run-dir DIR: the broker of the demo in DIR (its run.json); a stopped demo is refused."""
    from server_app.demo.run_file import mark_stopped, write_run_file

    _wait_subscribed(mosquitto_broker.port)
    write_run_file(tmp_path, api_url="http://127.0.0.1:1", broker_url=mosquitto_broker.url, token_file="x")
    mon = subprocess.Popen([sys.executable, "-m", "server_app.cli", "monitor", "--run-dir", str(tmp_path), "--count", "1",
                            "--timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = mon.communicate(timeout=60)
    assert mon.returncode == 0 and f"joined mqtt://127.0.0.1:{mosquitto_broker.port}" in err and out.strip(), err
    mark_stopped(tmp_path)
    mon = subprocess.run([sys.executable, "-m", "server_app.cli", "monitor", "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert mon.returncode == 1 and "has stopped" in mon.stderr, mon.stderr


def test_monitor_refused_credentials_exit_nonzero(tmp_path):
    """A connection the broker refuses, or a CA file that is not there, is one line and a non-zero exit."""
    mon = _monitor("mqtts://127.0.0.1:8883", "--ca-file", str(tmp_path / "nope.crt"))
    _, err = mon.communicate(timeout=30)
    assert mon.returncode == 2 and f"CA file {tmp_path / 'nope.crt'} not found" in err, err
