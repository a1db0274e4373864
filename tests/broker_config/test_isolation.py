"""No device credential can receive another device's messages or join the server's results group.

Against a real private Mosquitto 2.0 started from the generated config (dynamic-security plugin).
The attack that motivated it: with the old acl_file, `$share/koala-server/koala/v1/devices/+/up/result`
was SUBACKed (acl_file never checks SUBSCRIBE in 2.0.11), the broker dealt the device a share of
every result and dropped it at delivery for lack of `read`: results lost after PUBACK.
Negative delivery is shown with a sentinel on the same path (see mqtt_probe).
"""

from __future__ import annotations

import time

import pytest
from fleet_harness import needs_mosquitto, start_fleet
from mqtt_probe import Probe, Refused

from server_app.provisioning.identity import SERVER_ACCOUNT

P = "koala/v1"
SERVER_GROUP = "koala-server"  # services.py's default share group

ATTACKS = [
    f"$share/x/{P}/devices/+/up/result",
    f"$share/{SERVER_GROUP}/{P}/devices/+/up/result",
    f"$share/{SERVER_GROUP}/{P}/devices/+/up/#",
    f"$share/x/{P}/devices/dev-a/down/#",  # even its own downlink, as a share group
    f"{P}/devices/+/up/result",
    f"{P}/devices/dev-b/up/result",
    f"{P}/devices/+/status",
    f"{P}/devices/dev-b/status",
    f"{P}/devices/dev-b/down/#",
    f"{P}/devices/dev-b/down/assign",
    f"{P}/devices/+/down/#",
    f"{P}/devices/+/+/+",
    f"{P}/#",
    "koala/#",
    "#",
    "+/+/+/+/+",
    "$SYS/#",
    "$CONTROL/dynamic-security/v1/#",
]


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory):
    from server_app.provisioning.local_broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed")
    f = start_fleet(tmp_path_factory.mktemp("iso"), ["dev-a", "dev-b", "dev-c"])
    yield f
    f.broker.stop()


def device(fleet, name: str, **kw) -> Probe:
    return Probe(fleet.broker.tls_port, name, fleet.secrets[name], ca_file=fleet.ca, **kw).connect()


def server(fleet) -> Probe:
    return Probe(fleet.broker.plain_port, SERVER_ACCOUNT, fleet.secrets[SERVER_ACCOUNT]).connect()


@pytest.mark.parametrize("topic", ATTACKS)
def test_device_subscription_outside_its_grant_is_refused(iso, topic) -> None:
    a = device(iso, "dev-a")
    try:
        assert a.subscribe(topic)[0].is_failure, topic  # SUBACK 0x80: never joins any group
    finally:
        a.close()


def test_attacker_gets_nothing_and_server_gets_every_result(iso) -> None:
    srv = server(iso)
    attacker = device(iso, "dev-a")
    b = device(iso, "dev-b")
    try:
        assert not srv.subscribe(f"$share/{SERVER_GROUP}/{P}/devices/+/up/result")[0].is_failure
        for topic in ATTACKS:
            attacker.subscribe(topic)
        assert not attacker.subscribe(f"{P}/devices/dev-a/down/#")[0].is_failure
        for i in range(10):
            b.publish(f"{P}/devices/dev-b/up/result", b"r%d" % i)
        got = sorted(srv.next_message()[1] for _ in range(10))
        assert got == sorted(b"r%d" % i for i in range(10))  # 10 sent, 10 received
        # the server also writes dev-b's downlink; the attacker sees its own sentinel only
        srv.publish(f"{P}/devices/dev-b/down/assign", b"for-b")
        srv.publish(f"{P}/devices/dev-a/down/assign", b"sentinel")
        assert attacker.until(f"{P}/devices/dev-a/down/assign", b"sentinel") == []
    finally:
        for c in (attacker, b, srv):
            c.close()


def test_retained_messages_of_other_devices_are_not_delivered(iso) -> None:
    srv = server(iso)
    b = device(iso, "dev-b")
    try:
        b.publish(f"{P}/devices/dev-b/status", b'{"state":"online"}', retain=True)
        srv.publish(f"{P}/rounds/3/status", b"round", retain=True)
        srv.publish(f"{P}/devices/dev-b/down/assign", b"kept?", retain=True)  # broker keeps it retained
        c = device(iso, "dev-c")
        try:
            for topic in (f"{P}/devices/+/status", f"{P}/devices/dev-b/status", f"{P}/devices/dev-b/down/#", "#"):
                assert c.subscribe(topic)[0].is_failure
            assert not c.subscribe(f"{P}/rounds/#")[0].is_failure
            # retained round status is for everyone; it arrives, nothing of dev-b's does
            assert c.next_message() == (f"{P}/rounds/3/status", b"round")
            assert not c.subscribe(f"{P}/devices/dev-c/down/#")[0].is_failure
            srv.publish(f"{P}/devices/dev-c/down/assign", b"sentinel")
            assert c.until(f"{P}/devices/dev-c/down/assign", b"sentinel") == []
        finally:
            c.close()
    finally:
        srv.publish(f"{P}/devices/dev-b/down/assign", b"", retain=True)
        b.close()
        srv.close()


def test_monitor_cannot_join_a_share_group(iso) -> None:
    mon = Probe(iso.broker.plain_port, "koala-monitor", iso.secrets["koala-monitor"]).connect()
    try:
        assert mon.subscribe(f"$share/{SERVER_GROUP}/{P}/devices/+/up/result")[0].is_failure
        assert not mon.subscribe(f"{P}/#")[0].is_failure
    finally:
        mon.close()


@needs_mosquitto
def test_revoked_live_session_is_cut_within_seconds(tmp_path) -> None:
    fleet = start_fleet(tmp_path, ["dev-a", "dev-b"])
    try:
        secret = fleet.secrets["dev-a"]
        live = device(fleet, "dev-a")
        t0 = time.monotonic()
        fleet.revoke("dev-a")
        assert live.disconnected.wait(5.0)
        elapsed = time.monotonic() - t0
        live.client.loop_stop()
        print(f"revoke -> disconnect: {elapsed * 1000:.0f} ms")
        assert elapsed < 3.0
        with pytest.raises(Refused):
            Probe(fleet.broker.tls_port, "dev-a", secret, ca_file=fleet.ca).connect()
        device(fleet, "dev-b").close()  # the rest of the fleet is untouched
        # after a broker restart the regenerated file still lacks dev-a
        fleet.broker.stop()
        fleet.broker.start()
        with pytest.raises(Refused):
            Probe(fleet.broker.tls_port, "dev-a", secret, ca_file=fleet.ca).connect()
        device(fleet, "dev-b").close()
    finally:
        fleet.broker.stop()
