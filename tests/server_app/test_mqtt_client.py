"""The paho wrapper against real brokers: reconnect after a broker crash on the same port, queued
QoS 1 delivery to a persistent session, handler exceptions do not kill the loop, system Mosquitto."""

from __future__ import annotations

import time

import pytest
from mqtt_inbox import Inbox

from device_firmware_py.mqtt import MqttClient, parse_broker_url
from server_app.transport.broker import MosquittoBroker, find_mosquitto_binary

needs_mosquitto = pytest.mark.skipif(find_mosquitto_binary() is None, reason="mosquitto binary not installed")


def test_parse_broker_url():
    a = parse_broker_url("mqtts://dev%2F1:p%40ss@broker.example:8884")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker.example", 8884, True, "dev/1", "p@ss")
    assert parse_broker_url("mqtt://127.0.0.1").port == 1883
    assert parse_broker_url("mqtts://h").port == 8883
    with pytest.raises(ValueError):
        parse_broker_url("http://h")


@pytest.mark.mosquitto
@needs_mosquitto
def test_reconnects_and_resubscribes_after_broker_killed_and_restarted(tmp_path):
    broker = MosquittoBroker(workdir=tmp_path, persistence=False)  # no persistence: subs must be re-sent by us
    broker.start()
    try:
        inbox = Inbox()
        sub = MqttClient.from_url(broker.url, "reconnect-sub", keepalive=5)
        sub.subscribe("koala/v1/test/#", 1, inbox)
        assert sub.start(wait_s=10)
        pub = MqttClient.from_url(broker.url, "reconnect-pub", keepalive=5)
        assert pub.start(wait_s=10)
        assert pub.publish("koala/v1/test/a", b"before", wait_s=5)
        assert inbox.wait_for(1)[0] == ("koala/v1/test/a", b"before")

        port = broker.port
        broker.kill()  # crash
        deadline = time.monotonic() + 10
        while sub.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sub.connected.is_set()
        broker.restart()  # same port
        assert broker.port == port
        assert sub.wait_connected(30) and pub.wait_connected(30)
        assert sub.connect_count >= 2
        # the re-sent SUBSCRIBE and pub's PUBLISH travel on different connections: probe until the
        # broker has the subscription again (without the re-subscribe no probe ever arrives)
        deadline = time.monotonic() + 20
        while ("koala/v1/test/probe", b"p") not in inbox.wait_for(len(inbox.items) + 1, timeout=0.5):
            assert time.monotonic() < deadline, "subscription not restored after the broker restart"
            pub.publish("koala/v1/test/probe", b"p", wait_s=5)
        assert pub.publish("koala/v1/test/b", b"after", wait_s=10)
        assert ("koala/v1/test/b", b"after") in inbox.wait_for(len(inbox.items) + 1, timeout=10)
        sub.stop()
        pub.stop()
    finally:
        broker.cleanup()


@pytest.mark.mosquitto
def test_persistent_session_receives_qos1_sent_while_offline(mosquitto_broker):
    inbox = Inbox()
    dev = MqttClient("persist-dev", mosquitto_broker.host, mosquitto_broker.port, clean_session=False)
    dev.subscribe("koala/v1/devices/persist-dev/down/#", 1, inbox)
    assert dev.start(wait_s=10)
    dev.stop()  # offline, session kept by the broker
    srv = MqttClient("persist-srv", mosquitto_broker.host, mosquitto_broker.port)
    assert srv.start(wait_s=10)
    assert srv.publish("koala/v1/devices/persist-dev/down/assign", b"work", qos=1, wait_s=5)
    dev2 = MqttClient("persist-dev", mosquitto_broker.host, mosquitto_broker.port, clean_session=False)
    dev2.subscribe("koala/v1/devices/persist-dev/down/#", 1, inbox)
    assert dev2.start(wait_s=10)
    assert ("koala/v1/devices/persist-dev/down/assign", b"work") in inbox.wait_for(1)
    dev2.stop()
    srv.stop()


@pytest.mark.mosquitto
def test_handler_exception_does_not_kill_loop(mosquitto_broker, caplog):
    inbox = Inbox()

    def boom(_t: str, _p: bytes) -> None:
        raise RuntimeError("handler bug")

    c = MqttClient("boom", mosquitto_broker.host, mosquitto_broker.port, clean_session=True)
    c.subscribe("boom/bad", 1, boom)
    c.subscribe("boom/good", 1, inbox)
    assert c.start(wait_s=10)
    time.sleep(0.2)
    assert c.publish("boom/bad", b"1", wait_s=5)
    assert c.publish("boom/good", b"2", wait_s=5)
    assert inbox.wait_for(1) == [("boom/good", b"2")]
    assert any("handler bug" in r.getMessage() or r.exc_info for r in caplog.records)
    c.stop()


@pytest.mark.mosquitto
def test_mqtt5_client_on_mosquitto(mosquitto_broker):
    inbox = Inbox()
    c = MqttClient("v5client", mosquitto_broker.host, mosquitto_broker.port, protocol="5")
    c.subscribe("v5/t", 1, inbox)
    assert c.start(wait_s=10)
    time.sleep(0.2)
    assert c.publish("v5/t", b"five", wait_s=5)
    assert inbox.wait_for(1) == [("v5/t", b"five")]
    c.stop()


@pytest.mark.mosquitto
def test_system_mosquitto_reachable(system_mqtt):
    host, port = system_mqtt
    inbox = Inbox()
    topic = f"koala/v1/selftest/{time.time_ns()}"
    c = MqttClient(f"koala-selftest-{time.time_ns()}", host, port, clean_session=True)
    c.subscribe(topic, 1, inbox)
    assert c.start(wait_s=10)
    time.sleep(0.2)
    assert c.publish(topic, b"hello", wait_s=5)
    assert inbox.wait_for(1) == [(topic, b"hello")]
    c.stop()
