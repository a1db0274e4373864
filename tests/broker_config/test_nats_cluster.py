"""The clustered broker option (NATS Server 2.9, MQTT + JetStream): generated config, isolation.

A real 3-node cluster on loopback started from the generated `nats-<i>.conf` files
(server_app/provisioning/nats_cluster.py); devices connect over TLS to different nodes. The checks
are those of test_hardened_broker.py / test_isolation.py against Mosquitto; where NATS behaves
differently the test pins down what it does (client-id take-over, `$share`), as measured.
Negative delivery uses a sentinel on the same path (mqtt_probe): NATS keeps one publisher's order.
"""

from __future__ import annotations

import socket

import pytest
from mqtt_probe import Probe, Refused
from test_isolation import ATTACKS as MOSQUITTO_ATTACKS

from server_app.provisioning import nats_cluster as nc
from server_app.provisioning.identity import MONITOR_ACCOUNT, SERVER_ACCOUNT
from server_app.provisioning.passwords import new_secret

P = "koala/v1"
needs_nats = pytest.mark.skipif(nc.find_nats_server() is None, reason="nats-server not installed")

# every subscription the Mosquitto isolation test refuses, plus NATS's own MQTT machinery (QoS 1
# deliveries, stored messages, sessions, JetStream API)
ATTACKS = [*MOSQUITTO_ATTACKS, "$MQTT/sub/#", "$MQTT/msgs/#", "$MQTT/sess/#", "$MQTT/#", "$JS/API/#"]


# ---- generation (no broker) ----------------------------------------------------------------------


def test_mqtt_filters_map_to_nats_subjects() -> None:
    assert nc.subjects("koala/v1/devices/d1/up/result") == ["koala.v1.devices.d1.up.result"]
    assert nc.subjects("koala/v1/devices/+/status") == ["koala.v1.devices.*.status"]
    assert nc.subjects("koala/v1/rounds/#") == ["koala.v1.rounds", "koala.v1.rounds.>"]  # '#' matches the parent
    assert nc.subjects("#") == [">"]


def test_device_grants_come_from_the_topic_contract() -> None:
    from device_firmware_py.contract import topics

    perms = nc.device_permissions("d1")
    pub = perms["publish"]["allow"]
    assert pub == [nc.subjects(t)[0] for t in topics.acl_device_publish("d1")]
    assert all(".d1." in s for s in pub)  # only its own uplink
    sub = perms["subscribe"]["allow"]
    assert "koala.v1.devices.d1.down.>" in sub and nc.INTERNAL_SUB in sub
    assert not any("*" in s or s.startswith(">") for s in sub)  # no wildcard over other devices


def test_a_dotted_device_id_cannot_join_the_cluster(tmp_path) -> None:
    with pytest.raises(nc.NatsIdError):
        nc.device_permissions("pi.01")  # '.' would split the id into two subject tokens
    conf = nc.NatsClusterConf.plan(3, tmp_path, tmp_path / "data")
    files = nc.write_nats_files(tmp_path, [], conf, bcrypt_users=[("pi.01", nc.bcrypt_hash("s", 4)),
                                                                  ("pi-02", nc.bcrypt_hash("s", 4))])  # fmt: skip
    assert files.left_out == ["pi.01"]
    text = files.confs[0].read_text()
    assert '"pi-02"' in text and "pi.01" not in text


def test_plan_for_hosts_and_for_one_machine(tmp_path) -> None:
    lab = nc.NatsClusterConf.plan(3, tmp_path, tmp_path / "d", mqtt_port=8883)
    assert [n.mqtt_port for n in lab.nodes] == [8883, 8884, 8885]
    prod = nc.NatsClusterConf.plan(3, tmp_path, tmp_path / "d", hosts=["n1", "n2", "n3"])
    assert {n.mqtt_port for n in prod.nodes} == {8883} and prod.stream_replicas == 3
    text = nc.render_node(prod, prod.nodes[0], "")
    assert '"nats-route://n2:6222", "nats-route://n3:6222"' in text and "n1:6222" not in text


def test_secrets_store_keeps_the_bcrypt_of_the_current_secret_only(tmp_path) -> None:
    from server_app.provisioning.passwords import mosquitto_hash

    s1 = new_secret()
    h1 = mosquitto_hash(s1)
    nc.remember_secret(tmp_path, "d1", s1, h1)
    users, missing = nc.device_users(tmp_path, [("d1", h1), ("d2", mosquitto_hash("x"))])
    assert [u for u, _ in users] == ["d1"] and nc.bcrypt_verify(s1, users[0][1]) and missing == ["d2"]
    users, missing = nc.device_users(tmp_path, [("d1", mosquitto_hash(new_secret()))])  # rotated elsewhere
    assert users == [] and missing == ["d1"]
    assert (tmp_path / "secrets" / nc.BCRYPT_FILE).stat().st_mode & 0o077 == 0


# ---- a live 3-node cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if nc.find_nats_server() is None:
        pytest.skip("nats-server not installed")
    c = nc.PrivateNatsCluster(tmp_path_factory.mktemp("nats"), nodes=3)
    c.write_files({d: new_secret() for d in ("dev-a", "dev-b", "dev-c")})
    c.start()
    yield c
    c.stop()


def device(c: nc.PrivateNatsCluster, name: str, node: int = 1, **kw) -> Probe:
    return Probe(c.node(node).mqtt_port, name, c.secrets[name], ca_file=c.ca, **kw).connect()


def service(c: nc.PrivateNatsCluster, account: str = SERVER_ACCOUNT, node: int = 2) -> Probe:
    return Probe(c.node(node).mqtt_port, account, c.secrets[account], ca_file=c.ca).connect()


def drain(p: Probe, timeout: float = 1.5) -> list[bytes]:
    import queue

    out = []
    try:
        while True:
            out.append(p.next_message(timeout)[1])
    except queue.Empty:
        return out


def test_cluster_forms_and_routes_qos1_across_nodes(cluster) -> None:
    leaders = {cluster.meta_leader(i) for i in (1, 2, 3)}
    assert len(leaders) == 1 and None not in leaders
    assert cluster.mqtt_streams(3) >= {"$MQTT_sess", "$MQTT_msgs", "$MQTT_rmsgs"}
    srv = service(cluster, node=3)
    a = device(cluster, "dev-a", node=1)
    try:
        assert not srv.subscribe(f"{P}/devices/+/up/result")[0].is_failure
        assert not a.subscribe(f"{P}/devices/dev-a/down/#")[0].is_failure
        a.publish(f"{P}/devices/dev-a/up/result", b"r1")
        assert srv.next_message() == (f"{P}/devices/dev-a/up/result", b"r1")
        srv.publish(f"{P}/devices/dev-a/down/assign", b"a1")
        assert a.next_message() == (f"{P}/devices/dev-a/down/assign", b"a1")
    finally:
        a.close()
        srv.close()


def test_who_may_connect(cluster, tmp_path) -> None:
    from server_app.provisioning import tls

    port = cluster.node(1).mqtt_port
    with pytest.raises(Refused):
        Probe(port, ca_file=cluster.ca).connect()  # anonymous
    with pytest.raises(Refused):
        Probe(port, "dev-a", "not-the-secret", ca_file=cluster.ca).connect()
    with pytest.raises(Refused):
        Probe(port, "dev-a", cluster.secrets["dev-b"], ca_file=cluster.ca).connect()
    with pytest.raises(Refused):
        Probe(port, "intruder", "x", ca_file=cluster.ca).connect()
    with pytest.raises(Refused):
        Probe(port, "dev-a", cluster.secrets["dev-a"]).connect()  # plain MQTT to the TLS listener
    other = tmp_path / "other-ca.crt"
    other.write_bytes(tls.make_ca("someone else").cert_pem)
    with pytest.raises(Refused):
        Probe(port, "dev-a", cluster.secrets["dev-a"], ca_file=str(other)).connect()


def test_device_credentials_do_not_work_on_the_native_nats_port(cluster) -> None:
    """Every user is MQTT-only: natively, a device could subscribe to `$MQTT.sub.>` (the QoS 1
    deliveries of every session) which its MQTT grant needs but MQTT itself never lets it name."""
    with socket.create_connection(("127.0.0.1", cluster.node(1).client_port), timeout=5) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"INFO ")
        secret = cluster.secrets["dev-a"]
        f.write(b'CONNECT {"user":"dev-a","pass":"%s","verbose":false,"pedantic":false}\r\nPING\r\n' % secret.encode())
        f.flush()
        reply = f.readline()
    assert reply.startswith(b"-ERR") and b"Authorization Violation" in reply


def test_device_subscriptions_outside_its_grant_are_refused(cluster) -> None:
    a = device(cluster, "dev-a")
    try:
        refused = {t: a.subscribe(t)[0].is_failure for t in ATTACKS}
        assert refused == dict.fromkeys(ATTACKS, True)
        assert not a.disconnected.is_set()  # NATS answers SUBACK 0x80 and keeps the connection
        assert not a.subscribe(f"{P}/devices/dev-a/down/#")[0].is_failure
        assert not a.subscribe(f"{P}/rounds/#")[0].is_failure
        assert not a.subscribe(f"{P}/server/status")[0].is_failure
    finally:
        a.close()


def test_no_share_groups_for_anyone(cluster) -> None:
    """NATS 2.9 has no MQTT `$share` (it would be a literal subject, nothing delivered); the
    server's grant does not name it, so its start-up probe sees a refusal and runs one worker."""
    srv = service(cluster)
    mon = service(cluster, MONITOR_ACCOUNT)
    try:
        assert srv.subscribe(f"$share/koala-server/{P}/devices/+/up/result")[0].is_failure
        assert srv.subscribe(f"$share/koala-probe-x/{P}/server/probe-x")[0].is_failure
        assert mon.subscribe(f"$share/m/{P}/#")[0].is_failure
    finally:
        srv.close()
        mon.close()


def test_device_cannot_publish_on_another_devices_topics(cluster) -> None:
    srv = service(cluster, node=2)
    mon = service(cluster, MONITOR_ACCOUNT, node=3)
    b = device(cluster, "dev-b", node=3)
    a = device(cluster, "dev-a", node=1)
    try:
        assert not srv.subscribe(f"{P}/devices/+/up/#")[0].is_failure
        assert not srv.subscribe(f"{P}/devices/+/status")[0].is_failure
        assert not mon.subscribe(f"{P}/#")[0].is_failure
        assert not b.subscribe(f"{P}/devices/dev-b/down/#")[0].is_failure
        assert not b.subscribe(f"{P}/rounds/#")[0].is_failure
        for topic in ("up/result", "up/progress", "status", "down/assign"):
            a.publish(f"{P}/devices/dev-b/{topic}", b"forged")
        for topic in (f"{P}/devices/dev-a/down/assign", f"{P}/rounds/1/status", f"{P}/server/status"):
            a.publish(topic, b"forged")
        a.publish(f"{P}/devices/dev-a/up/result", b"sentinel")
        for sub in (srv, mon):
            before = sub.until(f"{P}/devices/dev-a/up/result", b"sentinel")
            assert [m for m in before if m[1] == b"forged"] == []
        srv.publish(f"{P}/devices/dev-b/down/assign", b"sentinel-b")
        assert all(m[1] != b"forged" for m in b.until(f"{P}/devices/dev-b/down/assign", b"sentinel-b"))
    finally:
        for c in (a, b, srv, mon):
            c.close()


def test_retained_and_rounds_reach_devices_but_monitor_cannot_publish(cluster) -> None:
    srv = service(cluster, node=1)
    mon = service(cluster, MONITOR_ACCOUNT, node=2)
    try:
        srv.publish(f"{P}/server/status", b"online", retain=True)
        srv.publish(f"{P}/rounds/7/status", b"open", retain=True)
        for topic in (f"{P}/devices/dev-c/down/assign", f"{P}/rounds/9/status", f"{P}/server/status"):
            mon.publish(topic, b"from-monitor")
        c = device(cluster, "dev-c", node=3)
        try:
            c.subscribe(f"{P}/server/status")
            c.subscribe(f"{P}/rounds/#")
            c.subscribe(f"{P}/devices/dev-c/down/#")
            got = {c.next_message(), c.next_message()}
            assert got == {(f"{P}/server/status", b"online"), (f"{P}/rounds/7/status", b"open")}
            srv.publish(f"{P}/devices/dev-c/down/assign", b"sentinel")
            assert all(m[1] != b"from-monitor" for m in c.until(f"{P}/devices/dev-c/down/assign", b"sentinel"))
        finally:
            c.close()
    finally:
        srv.close()
        mon.close()


def test_client_id_take_over_as_measured_on_nats(cluster) -> None:
    """NATS 2.9 cannot bind an MQTT client id to a user (Mosquitto refuses the CONNECT). Measured:
    dev-b may connect as `koala-dev-dev-a`, on any node, and the live dev-a is disconnected (MQTT
    take-over). The session's subscriptions are re-checked against dev-b's permissions when it is
    resumed (`Subscription Violation` in the log), so dev-b receives nothing of dev-a's, and a
    persistent take-over leaves dev-a's queued messages for it; a clean-session take-over deletes
    the session, and what was queued for dev-a is lost (a denial of service, not a leak)."""
    srv = service(cluster, node=2)
    try:
        a = device(cluster, "dev-a", node=1, clean_session=False)
        assert not a.subscribe(f"{P}/devices/dev-a/down/#")[0].is_failure
        thief = device(cluster, "dev-b", node=3, client_id="koala-dev-dev-a", clean_session=False)
        assert a.disconnected.wait(5)  # the victim is kicked, across nodes
        a.close()
        srv.publish(f"{P}/devices/dev-a/down/assign", b"for-a-1")
        assert drain(thief) == []
        thief.close()
        a = device(cluster, "dev-a", node=2, clean_session=False)
        assert drain(a) == [b"for-a-1"]
        a.close()
        srv.publish(f"{P}/devices/dev-a/down/assign", b"for-a-2")
        device(cluster, "dev-b", node=1, client_id="koala-dev-dev-a", clean_session=True).close()
        a = device(cluster, "dev-a", node=1, clean_session=False)
        assert drain(a, 1.0) == []  # the clean take-over wiped dev-a's session
        a.close()
    finally:
        srv.close()


# ---- `koala provision fleet` with `broker: {kind: nats}` -----------------------------------------


def _fleet_manifest(tmp_path, broker: str, ids=("pi-01", "pi-02")):
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    (wheels / "requirements.lock").write_text("numpy==2.0.0\n")
    (wheels / "koala_edge_device-0.1.0-py3-none-any.whl").write_bytes(b"stand-in")
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    lines = ["name: nats-fleet", f"database: {{url: '{db}'}}", f"broker: {broker}",
             "bundles: {out: bundles, wheelhouse: wheels}", "devices:",
             *(f"  - {{id: '{i}', arch: cnn_small, data: /d.npz}}" for i in ids)]  # fmt: skip
    path = tmp_path / "fleet.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fleet_writes_one_config_per_node_with_the_bundles_secrets(tmp_path, capsys) -> None:
    import json
    import subprocess

    from server_app.cli import main as koala

    broker = "{url: 'mqtts://n1.lan:8883', kind: nats, nodes: 3, cluster_hosts: [n1.lan, n2.lan, n3.lan]}"
    work = tmp_path / "work"
    assert koala(["provision", "fleet", str(_fleet_manifest(tmp_path, broker)), "--out", str(work)]) == 0
    out = capsys.readouterr().out
    confs = [work / "broker" / f"nats-{i}.conf" for i in (1, 2, 3)]
    assert all(p.is_file() for p in confs) and "warning" not in out, out
    text = confs[1].read_text()
    assert "server_name: nats-2" in text and '"nats-route://n1.lan:6222", "nats-route://n3.lan:6222"' in text
    for dev in ("pi-01", "pi-02"):
        secret = (work / "bundles" / f"koala-bundle-{dev}" / "etc/koala/device.secret").read_text().strip()
        hashed = text.split(f'user: "{dev}"\n      password: "', 1)[1].split('"', 1)[0]
        assert nc.bcrypt_verify(secret, hashed)  # the bundle's secret opens the cluster
        assert secret not in text
        cfg = json.loads((work / "bundles" / f"koala-bundle-{dev}" / "etc/koala/device.json").read_text())
        assert cfg["broker_url"] == "mqtts://n1.lan:8883"
    assert "n3.lan" in (work / "broker" / "certs" / "route.hosts").read_text()
    if nc.find_nats_server():
        for p in confs:  # nats-server parses what we wrote
            r = subprocess.run([nc.find_nats_server(), "-c", str(p), "-t"], capture_output=True, text=True, timeout=20)
            assert r.returncode == 0, r.stdout + r.stderr
    before = {p: p.read_bytes() for p in confs}
    assert koala(["provision", "fleet", str(_fleet_manifest(tmp_path, broker)), "--out", str(work)]) == 0
    assert {p: p.read_bytes() for p in confs} == before  # idempotent: no bcrypt re-salted


@pytest.mark.parametrize(
    ("broker", "ids", "needle"),
    [
        ("{url: 'mqtts://h:8883', nodes: 3}", ("pi-01",), "need kind: nats"),
        ("{url: 'mqtts://h:8883', kind: nats, nodes: 3, cluster_hosts: [a, b]}", ("pi-01",), "3 nodes but 2"),
        ("{url: 'mqtts://h:8883', kind: nats, nodes: 3}", ("pi.01",), "cannot be used on the NATS"),
    ],
)
def test_bad_cluster_manifest_is_one_line(tmp_path, capsys, broker, ids, needle) -> None:
    from server_app.cli import main as koala

    assert koala(["provision", "fleet", str(_fleet_manifest(tmp_path, broker, ids)), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


# ---- failover: MqttClient with several nodes --------------------------------------------------------


@needs_nats
@pytest.mark.slow  # ~20 s: NATS needs 4-15 s to re-elect the JetStream leaders the killed node held
def test_client_fails_over_to_a_surviving_node_and_keeps_its_session(tmp_path) -> None:
    """Connected to node 1 with a persistent session and a QoS 1 subscription; node 1 is killed
    (SIGKILL); the client moves to another node and gets the QoS 1 messages published meanwhile
    (the session and its queue are JetStream streams with 3 replicas, so they survive the node).

    Measured: reconnects fail (NATS answers CONNACK only after its JetStream requests, which time
    out after 4 s while the stream/consumer leaders of the dead node are re-elected) and succeed
    after 4-15 s. A node killed within ~1 s of the session's creation left a session that said
    `session_present=1` but delivered nothing at all (its consumers' leaders were still being
    placed): hence the settle time below, and docs/broker-cluster.md."""
    import queue
    import time

    from device_firmware_py.mqtt import MqttClient

    c = nc.PrivateNatsCluster(tmp_path, nodes=3)
    c.write_files({"dev-a": new_secret()})
    c.start()
    try:
        got: queue.Queue = queue.Queue()
        dev = MqttClient.from_urls(c.urls(), "koala-dev-dev-a", username="dev-a", password=c.secrets["dev-a"],
                                   ca_file=c.ca, reconnect_min_s=0.1, reconnect_max_s=1.0)  # fmt: skip
        assert dev.hosts == [("127.0.0.1", p) for p in c.mqtt_ports()]
        dev.subscribe(f"{P}/devices/dev-a/down/#", 1, lambda t, p: got.put(p))
        assert dev.start(wait_s=10) and dev.port == c.node(1).mqtt_port
        srv = service(c, node=3)
        srv.publish(f"{P}/devices/dev-a/down/assign", b"before")
        assert got.get(timeout=10) == b"before"
        time.sleep(3)  # let the session's consumers settle on their replicas (see the docstring)
        t0 = time.monotonic()
        c.kill_node(1)
        sent = []
        for i in range(5):  # while the device is away (QoS 1, the server's node survives)
            srv.publish(f"{P}/devices/dev-a/down/assign", b"during-%d" % i)
            sent.append(b"during-%d" % i)
        assert dev.connect_count == 1 or dev.port != c.node(1).mqtt_port
        deadline = time.monotonic() + 60
        while not (dev.connected.is_set() and dev.connect_count >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        failover_s = time.monotonic() - t0
        assert dev.connect_count >= 2 and dev.port != c.node(1).mqtt_port, dev.last_error
        received = []
        while len(received) < len(sent):
            received.append(got.get(timeout=30))
        assert sorted(received) == sent  # every message queued meanwhile, none lost
        time.sleep(0.5)
        assert got.empty()  # none twice
        print(f"failover_s={failover_s:.2f}")
        c.restart_node(1)  # the killed node rejoins: meta leader known, MQTT accepted
        assert c.meta_leader(1) is not None
        srv.close()
        dev.stop()
    finally:
        c.stop()


def test_client_rotates_over_its_broker_urls() -> None:
    from device_firmware_py.mqtt import MqttClient

    c = MqttClient.from_urls(["mqtts://n1:8883", "mqtts://n2:8884", "mqtts://n3"], "x", username="u", password="p")
    assert c.hosts == [("n1", 8883), ("n2", 8884), ("n3", 8883)] and c.client.pick_host is not None
    assert [c._pick_host() for _ in range(4)] == [("n1", 8883), ("n2", 8884), ("n3", 8883), ("n1", 8883)]
    assert MqttClient.from_url("mqtt://h:1", "y").client.pick_host is None  # one host: paho as before
    with pytest.raises(ValueError, match="mix"):
        MqttClient.from_urls(["mqtt://a", "mqtts://b"], "z")
