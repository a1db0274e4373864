"""The generated production broker enforces who may connect and who may publish/read what.

Everything here talks to a real private Mosquitto started from the generated config; nothing is
mocked. Device accounts connect over TLS (as in the field), the server over its loopback listener.
"""

from __future__ import annotations

import queue

import paho.mqtt.client as mqtt
import pytest
from mqtt_probe import Probe, Refused

P = "koala/v1"


def device(fleet, name: str, **kw) -> Probe:
    return Probe(fleet.broker.tls_port, name, fleet.secrets[name], ca_file=fleet.ca, **kw).connect()


def server(fleet) -> Probe:
    return Probe(fleet.broker.plain_port, "koala-server", fleet.secrets["koala-server"]).connect()


def test_anonymous_is_refused_on_both_listeners(fleet) -> None:
    with pytest.raises(Refused):
        Probe(fleet.broker.plain_port).connect()
    with pytest.raises(Refused):
        Probe(fleet.broker.tls_port, ca_file=fleet.ca).connect()


def test_wrong_password_and_unknown_user_are_refused(fleet) -> None:
    with pytest.raises(Refused):
        Probe(fleet.broker.tls_port, "dev-a", "not-the-secret", ca_file=fleet.ca).connect()
    with pytest.raises(Refused):
        Probe(fleet.broker.tls_port, "dev-a", fleet.secrets["dev-b"], ca_file=fleet.ca).connect()
    with pytest.raises(Refused):
        Probe(fleet.broker.tls_port, "intruder", "x", ca_file=fleet.ca).connect()


def test_client_id_take_over_is_refused(fleet) -> None:
    """A device logged in with its own account but another device's client id (`koala-dev-<id>`, easy
    to guess) used to disconnect that device; the broker binds each account to its own id, so the
    attempt is refused and the victim stays connected. Any other id is refused too."""
    victim = device(fleet, "dev-a")
    try:
        with pytest.raises(Refused):
            Probe(fleet.broker.tls_port, "dev-b", fleet.secrets["dev-b"], ca_file=fleet.ca,
                  client_id="koala-dev-dev-a").connect()  # fmt: skip
        with pytest.raises(Refused):
            Probe(fleet.broker.tls_port, "dev-b", fleet.secrets["dev-b"], ca_file=fleet.ca, client_id="anything").connect()
        assert not victim.disconnected.is_set()
        device(fleet, "dev-b").close()  # its own bound id works
        victim.client.publish(f"{P}/devices/dev-a/up/progress", b"{}", qos=1).wait_for_publish(5)
        assert not victim.disconnected.is_set()
    finally:
        victim.close()


def test_plain_mqtt_to_the_tls_port_fails(fleet) -> None:
    with pytest.raises(Refused):
        Probe(fleet.broker.tls_port, "dev-a", fleet.secrets["dev-a"]).connect()


def test_tls_with_an_untrusted_ca_fails(fleet, tmp_path) -> None:
    from server_app.provisioning import tls

    other = tmp_path / "other-ca.crt"
    other.write_bytes(tls.make_ca("someone else").cert_pem)
    with pytest.raises(Refused):
        Probe(fleet.broker.tls_port, "dev-a", fleet.secrets["dev-a"], ca_file=str(other)).connect()


def test_device_cannot_publish_on_another_devices_topics(fleet) -> None:
    srv = server(fleet)
    mon = Probe(fleet.broker.plain_port, "koala-monitor", fleet.secrets["koala-monitor"]).connect()
    a = device(fleet, "dev-a")
    try:
        # the server's own filters (a broader `devices/+/#` is not granted to it)
        assert not srv.subscribe(f"{P}/devices/+/up/#")[0].is_failure
        assert not srv.subscribe(f"{P}/devices/+/status")[0].is_failure
        mon.subscribe(f"{P}/#")
        for topic in ("up/result", "up/progress", "status"):
            a.publish(f"{P}/devices/dev-b/{topic}", b"forged")
        a.publish(f"{P}/devices/dev-b/down/assign", b"forged")  # not even its own downlink
        a.publish(f"{P}/devices/dev-a/down/assign", b"forged")
        a.publish(f"{P}/rounds/1/status", b"forged")
        a.publish(f"{P}/server/status", b"forged")
        a.publish(f"{P}/devices/dev-a/up/result", b"sentinel")
        for sub in (srv, mon):
            before = sub.until(f"{P}/devices/dev-a/up/result", b"sentinel")
            assert [m for m in before if m[1] == b"forged"] == []
    finally:
        for c in (a, srv, mon):
            c.close()


def test_device_cannot_read_another_devices_assignments(fleet) -> None:
    srv = server(fleet)
    a = device(fleet, "dev-a")
    try:
        # refused at SUBSCRIBE (dynamic-security plugin), and `read` is still enforced per message
        assert a.subscribe(f"{P}/devices/dev-b/down/#")[0].is_failure
        assert a.subscribe(f"{P}/devices/+/down/#")[0].is_failure  # a wildcard must not widen the grant
        assert a.subscribe(f"{P}/#")[0].is_failure
        assert not a.subscribe(f"{P}/devices/dev-a/down/#")[0].is_failure
        srv.publish(f"{P}/devices/dev-b/down/assign", b"for-b-only")
        srv.publish(f"{P}/devices/dev-a/down/assign", b"sentinel")
        before = a.until(f"{P}/devices/dev-a/down/assign", b"sentinel")
        assert all(m[1] != b"for-b-only" for m in before)
    finally:
        a.close()
        srv.close()


def test_server_account_does_its_job(fleet) -> None:
    srv = server(fleet)
    srv2 = server(fleet)
    b = device(fleet, "dev-b", will=(f"{P}/devices/dev-b/status", b'{"state":"offline"}'))
    try:
        # shared-subscription ingestion of results, plain subscription of status
        inbox: queue.Queue = queue.Queue()
        srv.client.on_message = lambda _c, _u, m: inbox.put(("srv", (m.topic, m.payload)))
        srv2.client.on_message = lambda _c, _u, m: inbox.put(("srv2", (m.topic, m.payload)))
        assert not srv.subscribe(f"$share/koala/{P}/devices/+/up/#")[0].is_failure
        assert not srv2.subscribe(f"$share/koala/{P}/devices/+/up/#")[0].is_failure
        assert not srv.subscribe(f"{P}/devices/+/status")[0].is_failure
        b.subscribe(f"{P}/devices/dev-b/down/#")
        b.subscribe(f"{P}/rounds/#")
        b.subscribe(f"{P}/server/status")
        srv.publish(f"{P}/server/status", b"online", retain=True)
        srv.publish(f"{P}/rounds/7/status", b"open", retain=True)
        srv.publish(f"{P}/devices/dev-b/down/assign", b"assignment")
        got = {b.next_message() for _ in range(3)}
        assert got == {
            (f"{P}/server/status", b"online"),
            (f"{P}/rounds/7/status", b"open"),
            (f"{P}/devices/dev-b/down/assign", b"assignment"),
        }
        b.publish(f"{P}/devices/dev-b/status", b'{"state":"online"}', retain=True)
        assert inbox.get(timeout=10) == ("srv", (f"{P}/devices/dev-b/status", b'{"state":"online"}'))
        for i in range(6):
            b.publish(f"{P}/devices/dev-b/up/result", b"r%d" % i)
        # each result goes to exactly one of the two workers in the share group
        results = [inbox.get(timeout=10) for _ in range(6)]
        assert sorted(p for _w, (_t, p) in results) == [b"r%d" % i for i in range(6)]
        assert {w for w, _m in results} == {"srv", "srv2"}  # the share group split the load
    finally:
        for c in (b, srv, srv2):
            c.close()


def test_monitor_reads_everything_but_cannot_publish(fleet) -> None:
    mon = Probe(
        fleet.broker.plain_port, "koala-monitor", fleet.secrets["koala-monitor"], protocol=mqtt.MQTTv5
    ).connect()
    srv = server(fleet)
    a = device(fleet, "dev-a")
    try:
        mon.subscribe(f"{P}/#")
        a.subscribe(f"{P}/devices/dev-a/down/#")
        a.subscribe(f"{P}/rounds/#")
        a.subscribe(f"{P}/server/status")
        a.publish(f"{P}/devices/dev-a/up/progress", b"p1")
        assert mon.until(f"{P}/devices/dev-a/up/progress", b"p1") is not None
        for topic in (f"{P}/devices/dev-a/down/assign", f"{P}/rounds/9/status", f"{P}/server/status"):
            mon.publish(topic, b"from-monitor")  # QoS 1: the broker has handled it at PUBACK
        srv.publish(f"{P}/devices/dev-a/down/assign", b"sentinel")
        before = a.until(f"{P}/devices/dev-a/down/assign", b"sentinel")
        assert all(m[1] != b"from-monitor" for m in before)
    finally:
        for c in (a, srv, mon):
            c.close()
