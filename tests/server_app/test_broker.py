"""Embedded brokers: both start on loopback; retained + Last Will work; $share splits on Mosquitto;
amqtt says it has no shared subscriptions (and indeed delivers nothing to them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mqtt_inbox import Inbox

from device_firmware_py.mqtt import MqttClient
from server_app.transport.broker import (
    AmqttBroker,
    MosquittoBroker,
    find_mosquitto_binary,
    make_embedded_broker,
)


def connect(broker, cid: str, **kw) -> MqttClient:
    c = MqttClient(cid, broker.host, broker.port, **kw)
    assert c.start(wait_s=10), f"{cid} could not connect to {broker.url}"
    return c


def _retained_and_will(broker, tag: str) -> None:
    """A child process connects with a Last Will and is SIGKILLed; a monitor sees retained + will."""
    c = connect(broker, f"pub-{tag}")
    c.publish(f"t/{tag}/retained", b"kept", retain=True, wait_s=5)
    c.stop()
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys,time; from device_firmware_py.mqtt import MqttClient, Will;"
            f"c=MqttClient('dying-{tag}','{broker.host}',{broker.port},keepalive=2,"
            f"will=Will('t/{tag}/will', b'offline'));"
            "assert c.start(wait_s=10); print('up', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline().strip() == b"up"
        inbox = Inbox()
        mon = connect(broker, f"mon-{tag}", clean_session=True)
        mon.subscribe(f"t/{tag}/#", 1, inbox)
        assert (f"t/{tag}/retained", b"kept") in inbox.wait_for(1)
        os.kill(child.pid, signal.SIGKILL)
        got = inbox.wait_for(2, timeout=15)
        assert (f"t/{tag}/will", b"offline") in got
        mon.stop()
    finally:
        child.kill()
        child.wait()


@pytest.mark.mosquitto
def test_mosquitto_starts_on_loopback(mosquitto_broker):
    assert mosquitto_broker.running and mosquitto_broker.host == "127.0.0.1"
    assert mosquitto_broker.url == f"mqtt://127.0.0.1:{mosquitto_broker.port}"
    assert mosquitto_broker.features.shared_subscriptions and mosquitto_broker.features.v5
    assert f"listener {mosquitto_broker.port} 127.0.0.1" in mosquitto_broker.config_path.read_text()


@pytest.mark.mosquitto
def test_mosquitto_retained_and_last_will(mosquitto_broker):
    _retained_and_will(mosquitto_broker, "mq")


def test_amqtt_retained_and_last_will(amqtt_broker):
    assert amqtt_broker.features.shared_subscriptions is False and amqtt_broker.features.v5 is False
    _retained_and_will(amqtt_broker, "am")


@pytest.mark.mosquitto
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_mosquitto_shared_subscription_splits_load(mosquitto_broker, protocol):
    boxes = [Inbox(), Inbox()]
    workers = []
    for i, box in enumerate(boxes):
        w = MqttClient(f"worker{i}-{protocol}", mosquitto_broker.host, mosquitto_broker.port, protocol=protocol, clean_session=True)
        w.subscribe(f"$share/ingest/split/{protocol}/+", 1, box)
        assert w.start(wait_s=10)
        workers.append(w)
    time.sleep(0.3)  # SUBACKs; no assertion on time, only ordering
    pub = connect(mosquitto_broker, f"splitpub-{protocol}")
    for i in range(40):
        assert pub.publish(f"split/{protocol}/{i}", b"x", wait_s=5)
    deadline = time.monotonic() + 10
    while sum(len(b.items) for b in boxes) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    counts = [len(b.items) for b in boxes]
    assert sum(counts) == 40 and min(counts) > 0, counts  # each message once, both workers used
    for c in (*workers, pub):
        c.stop()


def test_amqtt_has_no_shared_subscriptions(amqtt_broker):
    """What `features` claims is true: $share subscribers get nothing on amqtt."""
    box, plain = Inbox(), Inbox()
    w = MqttClient("am-worker", amqtt_broker.host, amqtt_broker.port, clean_session=True)
    w.subscribe("$share/ingest/amsplit/+", 1, box)
    assert w.start(wait_s=10)
    p = MqttClient("am-plain", amqtt_broker.host, amqtt_broker.port, clean_session=True)
    p.subscribe("amsplit/+", 1, plain)
    assert p.start(wait_s=10)
    time.sleep(0.3)
    pub = connect(amqtt_broker, "am-splitpub")
    for i in range(5):
        pub.publish(f"amsplit/{i}", b"x", wait_s=5)
    plain.wait_for(5)
    assert len(plain.items) == 5 and box.items == []  # the $share filter never matched
    w.stop()
    p.stop()
    pub.stop()


def test_amqtt_refuses_mqtt5(amqtt_broker):
    c = MqttClient("am-v5", amqtt_broker.host, amqtt_broker.port, protocol="5")
    assert c.start(wait_s=2) is False
    c.stop()


def test_make_embedded_broker_choice(tmp_path):
    b = make_embedded_broker(prefer="amqtt")
    assert isinstance(b, AmqttBroker)
    if find_mosquitto_binary():
        m = make_embedded_broker(workdir=tmp_path)
        assert isinstance(m, MosquittoBroker)
    with pytest.raises(ValueError):
        make_embedded_broker(prefer="emqx")


@pytest.mark.mosquitto
def test_mosquitto_password_file_refuses_anonymous(tmp_path):
    if find_mosquitto_binary() is None:
        pytest.skip("no mosquitto")
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "srv", "s3cret"], check=True, capture_output=True) if _has_passwd() else pytest.skip("no mosquitto_passwd")
    with MosquittoBroker(workdir=tmp_path / "b", password_file=pw) as b:
        anon = MqttClient("anon", b.host, b.port)
        assert anon.start(wait_s=2) is False
        anon.stop()
        ok = MqttClient("srv", b.host, b.port, username="srv", password="s3cret")
        assert ok.start(wait_s=10)
        ok.stop()


def _has_passwd() -> bool:
    import shutil

    return shutil.which("mosquitto_passwd") is not None or os.path.exists("/usr/bin/mosquitto_passwd")
