"""A clustered MQTT broker: NATS Server (MQTT + JetStream), N nodes, generated from the same grants.

    broker: {kind: nats, nodes: 3}      (fleet manifest)  ->  DIR/nats-1.conf ... DIR/nats-N.conf

Why NATS: Mosquitto 2.0 is one process; NATS Server 2.9 speaks MQTT 3.1.1 on every node of a
cluster and keeps MQTT sessions, QoS 1 queues and retained messages in JetStream streams that are
replicated (`stream_replicas`) over the cluster, so a device can move to a surviving node.

What is generated, per node (docs/broker-cluster.md has the measured behaviour):
  * one MQTT listener with TLS (the broker's certificate from `tls.py`; the server connects over
    TLS too: NATS has a single MQTT listener per node), a loopback-only NATS client port, a loopback
    monitoring port (the launcher reads `/jsz` to see the JetStream meta leader), cluster routes
    with TLS (a route certificate valid for server *and* client auth, as NATS verifies both ends);
  * one NATS user per device and per service account, bcrypt-hashed secrets (NATS has no PBKDF2:
    the registry's `$7$` hash cannot be converted, so the clear secret is hashed when it is issued
    and kept in DIR/secrets/nats-bcrypt.json next to the `$7$` it belongs to), every user limited to
    MQTT connections (`allowed_connection_types`: the native protocol could subscribe to the
    internal `$MQTT.sub.>` deliveries of every session);
  * permissions from the topic contract's grant helpers (the one source, as `dynsec.py`): MQTT
    `koala/v1/devices/D/up/result` is NATS subject `koala.v1.devices.D.up.result`, `+` is `*`, and
    `a/#` is two subjects `a` and `a.>` (MQTT's `#` also matches the parent). Every MQTT user also
    needs `$MQTT.sub.>` to subscribe: a QoS 1 subscription is a JetStream consumer that delivers to
    `$MQTT.sub.<nuid>` on the client's own connection.

What NATS 2.9 cannot do, and the consequences (measured in tests/broker_config/test_nats_cluster.py):
  * no binding of an MQTT client id to a user (Mosquitto's dynamic-security `clientid`);
  * no MQTT `$share` delivery (a `$share/...` filter is a literal subject; not granted here, so the
    SUBACK is a failure); the server runs one ingestion worker there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_firmware_py.contract import topics
from server_app.provisioning import tls
from server_app.provisioning.identity import ADMIN_ACCOUNT, MONITOR_ACCOUNT, SERVER_ACCOUNT, check_device_id

P = topics.PREFIX
BINARY_CANDIDATES = ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server")
BCRYPT_FILE = "nats-bcrypt.json"
BCRYPT_COST = 6  # 256-bit random secrets: a low cost keeps a failover reconnect storm cheap (cf. passwords.py)
INTERNAL_SUB = "$MQTT.sub.>"  # where JetStream delivers a QoS 1 subscription to its MQTT connection
CLUSTER_NAME = "koala"


def find_nats_server() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    return next((p for p in BINARY_CANDIDATES if Path(p).is_file()), None)


# ---- MQTT topic filters -> NATS subjects --------------------------------------------------------


class NatsIdError(ValueError):
    """A name that cannot be expressed on NATS subjects (a '.' is NATS's level separator)."""


def check_nats_device_id(device_id: str) -> str:
    """The contract allows '.' in device ids; on NATS it would split the id into two subject tokens
    (and NATS 2.9 refuses MQTT topics with a '.'), so such a device cannot join the cluster."""
    check_device_id(device_id)
    if "." in device_id:
        raise NatsIdError(f"device id {device_id!r}: a '.' cannot be used on the NATS cluster broker")
    return device_id


def subjects(topic_filter: str) -> list[str]:
    """NATS subjects equivalent to one MQTT topic filter (`a/#` is `a` and `a.>`)."""
    if "." in topic_filter or " " in topic_filter:
        raise NatsIdError(f"topic filter {topic_filter!r} cannot be expressed on NATS subjects")
    levels = ["*" if lv == "+" else lv for lv in topic_filter.split("/")]
    if levels[-1] == "#":
        parent = levels[:-1]
        return [".".join(parent), ".".join([*parent, ">"])] if parent else [">"]
    return [".".join(levels)]


def _subjects(filters: Iterable[str]) -> list[str]:
    out: list[str] = []
    for f in filters:
        out += [s for s in subjects(f) if s not in out]
    return out


def device_permissions(device_id: str) -> dict[str, Any]:
    """Publish its own uplink; subscribe to its own downlink, the rounds and the server status."""
    check_nats_device_id(device_id)
    return {
        "publish": {"allow": _subjects(topics.acl_device_publish(device_id))},
        "subscribe": {"allow": [*_subjects(topics.acl_device_read(device_id)), INTERNAL_SUB]},
    }


def server_permissions() -> dict[str, Any]:
    server = f"{P}/server/#"  # server/probe-*: the $share support probe (refused here: no $share on NATS)
    return {
        "publish": {"allow": _subjects([*topics.acl_server_publish(), server])},
        "subscribe": {"allow": [*_subjects([*topics.acl_server_read(), server]), INTERNAL_SUB]},
    }


def monitor_permissions() -> dict[str, Any]:
    return {"publish": {"deny": [">"]}, "subscribe": {"allow": [*_subjects([topics.filter_everything()]), INTERNAL_SUB]}}


# ---- secrets: bcrypt (NATS) beside the registry's $7$ (Mosquitto) ----------------------------------


def bcrypt_hash(secret: str, cost: int = BCRYPT_COST) -> str:
    try:
        import bcrypt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the NATS cluster broker needs the `bcrypt` package (pip install bcrypt)") from exc
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(cost)).decode()


def bcrypt_verify(secret: str, hashed: str) -> bool:
    import bcrypt

    try:
        return bcrypt.checkpw(secret.encode(), hashed.encode())
    except ValueError:
        return False


def _store_path(broker_dir: Path) -> Path:
    return broker_dir / "secrets" / BCRYPT_FILE


def _load_store(broker_dir: Path) -> dict[str, dict[str, str]]:
    path = _store_path(broker_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def _save_store(broker_dir: Path, store: dict[str, dict[str, str]]) -> None:
    from server_app.provisioning.broker_files import atomic_write

    path = _store_path(broker_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, json.dumps(store, indent=1, sort_keys=True) + "\n", mode=0o600)


def remember_secret(broker_dir: Path, device_id: str, secret: str, pw_hash: str) -> None:
    """Keep the bcrypt of a freshly issued secret, tied to its registry `$7$` hash (a later rotation
    makes the entry stale: the device is then left out of the cluster config until re-issued)."""
    store = _load_store(broker_dir)
    store[device_id] = {"pbkdf2": pw_hash, "bcrypt": bcrypt_hash(secret)}
    _save_store(broker_dir, store)


def device_users(broker_dir: Path, credentials: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """(device_id, bcrypt) for every active credential whose secret we hashed; and the ids left out."""
    store = _load_store(broker_dir)
    users, missing = [], []
    for device_id, pw_hash in sorted(credentials):
        entry = store.get(device_id)
        if entry is not None and entry.get("pbkdf2") == pw_hash:
            users.append((device_id, entry["bcrypt"]))
        else:
            missing.append(device_id)
    return users, missing


def service_users(broker_dir: Path) -> list[tuple[str, str]]:
    """(account, bcrypt) for the server and the monitor; the bcrypt is kept while the secret matches."""
    from server_app.provisioning.accounts import ensure_service_accounts, read_secret

    ensure_service_accounts(broker_dir)
    store = _load_store(broker_dir)
    out = []
    for account in (SERVER_ACCOUNT, MONITOR_ACCOUNT):
        secret = read_secret(broker_dir, account)
        entry = store.get(account, {})
        if not entry.get("bcrypt") or not bcrypt_verify(secret, entry["bcrypt"]):
            store[account] = {"bcrypt": bcrypt_hash(secret)}
        out.append((account, store[account]["bcrypt"]))
    _save_store(broker_dir, store)
    return out


# ---- the per-node configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class NatsNode:
    index: int  # 1-based
    host: str  # what routes (other nodes) and clients dial
    mqtt_port: int
    cluster_port: int
    client_port: int
    monitor_port: int
    bind: str = "0.0.0.0"  # the MQTT listener's and the route listener's address

    @property
    def name(self) -> str:
        return f"nats-{self.index}"


@dataclass(frozen=True)
class NatsClusterConf:
    nodes: tuple[NatsNode, ...]
    conf_dir: Path  # where the files are read from by the nodes (certs/, nats-<i>.conf)
    data_dir: Path  # JetStream store root; node i uses data_dir/nats-<i>
    stream_replicas: int = 3
    max_connections: int = 1024
    log_dir: Path | None = None  # None: log to stderr (journald/docker)

    @staticmethod
    def plan(n: int, conf_dir: Path, data_dir: Path, *, hosts: Sequence[str] = (), mqtt_port: int = 8883,
             cluster_port: int = 6222, client_port: int = 4222, monitor_port: int = 8222, bind: str = "0.0.0.0",
             max_connections: int = 1024, log_dir: Path | None = None) -> NatsClusterConf:
        """N nodes: one per host in `hosts` (same ports everywhere) or, with no hosts, all on
        127.0.0.1 with port + i - 1 (a lab or test cluster on one machine)."""
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        if hosts and len(hosts) != n:
            raise ValueError(f"{n} nodes but {len(hosts)} cluster hosts")
        off = (lambda i: 0) if hosts else (lambda i: i)
        nodes = tuple(
            NatsNode(i + 1, hosts[i] if hosts else "127.0.0.1", mqtt_port + off(i), cluster_port + off(i),
                     client_port + off(i), monitor_port + off(i), bind if hosts else "127.0.0.1")
            for i in range(n)
        )
        return NatsClusterConf(nodes, conf_dir, data_dir, min(3, n), max_connections, log_dir)


def _q(s: str) -> str:
    return json.dumps(s)  # a NATS config string literal (JSON quoting is accepted)


def _perm_block(perms: dict[str, Any], indent: str) -> str:
    lines = [f"{indent}permissions: {{"]
    for kind in ("publish", "subscribe"):
        spec = perms.get(kind, {})
        parts = [f"{k}: [{', '.join(_q(s) for s in v)}]" for k, v in spec.items()]
        lines.append(f"{indent}  {kind}: {{ {' '.join(parts)} }}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def render_users(devices: Iterable[tuple[str, str]], services: Iterable[tuple[str, str]]) -> str:
    perms = {SERVER_ACCOUNT: server_permissions(), MONITOR_ACCOUNT: monitor_permissions()}
    entries = []
    for user, hashed in [*sorted(services), *sorted(devices)]:
        p = perms.get(user) or device_permissions(user)
        entries.append(
            f"    {{\n      user: {_q(user)}\n      password: {_q(hashed)}\n"
            f"      allowed_connection_types: [\"MQTT\"]\n{_perm_block(p, '      ')}\n    }}"
        )
    return "\n".join(entries)


def render_node(conf: NatsClusterConf, node: NatsNode, users_block: str) -> str:
    certs = conf.conf_dir / "certs"
    routes = ", ".join(_q(f"nats-route://{n.host}:{n.cluster_port}") for n in conf.nodes if n != node)
    log = f"log_file: {_q(str(conf.log_dir / (node.name + '.log')))}\n" if conf.log_dir else ""
    cluster = ""
    if len(conf.nodes) > 1:
        cluster = f"""
cluster {{
  name: {CLUSTER_NAME}
  listen: {_q(f"{node.bind}:{node.cluster_port}")}
  routes: [{routes}]
  tls {{
    cert_file: {_q(str(certs / "route.crt"))}
    key_file: {_q(str(certs / "route.key"))}
    ca_file: {_q(str(certs / "ca.crt"))}
    timeout: 5
  }}
}}
"""
    return f"""# Generated by `koala provision fleet` (broker kind nats): node {node.index} of {len(conf.nodes)}.
# Do not edit: re-run the command (accounts and permissions come from the device registry).
server_name: {node.name}
listen: {_q(f"127.0.0.1:{node.client_port}")}
http: {_q(f"127.0.0.1:{node.monitor_port}")}
max_connections: {conf.max_connections}
max_payload: 8MB
{log}
jetstream {{
  store_dir: {_q(str(conf.data_dir / node.name))}
}}

mqtt {{
  host: {_q(node.bind)}
  port: {node.mqtt_port}
  stream_replicas: {conf.stream_replicas}
  ack_wait: "30s"
  max_ack_pending: 100
  tls {{
    cert_file: {_q(str(certs / "server.crt"))}
    key_file: {_q(str(certs / "server.key"))}
    timeout: 5
  }}
}}
{cluster}
authorization {{
  users: [
{users_block}
  ]
}}
"""


def ensure_route_cert(broker_dir: Path, hosts: Sequence[str]) -> None:
    """A certificate for the cluster routes (server + client auth: both ends verify), from the CA."""
    certs = broker_dir / "certs"
    crt, key, names = certs / "route.crt", certs / "route.key", certs / "route.hosts"
    wanted = sorted(set(hosts) | {"localhost", "127.0.0.1"})
    if crt.exists() and names.exists() and set(wanted) <= set(names.read_text().split()):
        return
    ca = tls.load_pair(certs / "ca.crt", certs / "ca.key")
    tls.write_pair(tls.make_route_cert(ca, wanted), crt, key)
    names.write_text(" ".join(wanted) + "\n")


@dataclass(frozen=True)
class NatsFiles:
    dir: Path
    confs: list[Path]
    ca_cert: Path
    left_out: list[str]  # active devices with no bcrypt of their current secret (rotate to include)
    changed: bool


def write_nats_files(
    broker_dir: Path,
    credentials: Iterable[tuple[str, str]],
    conf: NatsClusterConf,
    tls_hosts: Sequence[str] = (),
    bcrypt_users: Iterable[tuple[str, str]] | None = None,
) -> NatsFiles:
    """`nats-<i>.conf` for every node, the PKI (shared CA with the Mosquitto files) and route cert.

    credentials: (device_id, registry `$7$` hash) of active devices; their bcrypt comes from the
    store `remember_secret` fills. bcrypt_users: (device_id, bcrypt) given directly (tests)."""
    from server_app.provisioning.broker_files import atomic_write, ensure_pki

    broker_dir.mkdir(parents=True, exist_ok=True)
    hosts = sorted({*tls_hosts, *(n.host for n in conf.nodes)})
    ca = ensure_pki(broker_dir, hosts)
    ensure_route_cert(broker_dir, hosts)
    if bcrypt_users is not None:
        devices, missing = sorted(bcrypt_users), list[str]()
    else:
        devices, missing = device_users(broker_dir, credentials)
    kept = []
    for d, h in devices:
        try:
            check_nats_device_id(d)
            kept.append((d, h))
        except NatsIdError:
            missing.append(d)
    users = render_users(kept, service_users(broker_dir))
    changed, paths = False, []
    for node in conf.nodes:
        path = broker_dir / f"{node.name}.conf"
        changed |= atomic_write(path, render_node(conf, node, users), mode=0o644)
        paths.append(path)
        (conf.data_dir / node.name).mkdir(parents=True, exist_ok=True) if conf.data_dir.is_absolute() else None
    return NatsFiles(broker_dir, paths, ca, sorted(missing), changed)


def device_urls(conf: NatsClusterConf) -> list[str]:
    """What a device (and the server) dials: every node's MQTT listener, TLS."""
    return [f"mqtts://{n.host}:{n.mqtt_port}" for n in conf.nodes]


# ---- a private cluster for tests and benchmarks --------------------------------------------------


def _free_ports(k: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class PrivateNatsCluster:
    """N nats-server child processes on free loopback ports, serving configs rendered into `dir`.

        c = PrivateNatsCluster(tmp, nodes=3); c.write_files({"dev-a": secret}); c.start()
        c.kill_node(1)  # SIGKILL;  c.restart_node(1);  c.stop()
    """

    dir: Path
    nodes: int = 3
    binary: str | None = None
    conf: NatsClusterConf | None = None
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    def write_files(self, device_secrets: dict[str, str]) -> NatsFiles:
        from server_app.provisioning.accounts import read_secret

        ports = _free_ports(4 * self.nodes)
        self.conf = NatsClusterConf(
            tuple(NatsNode(i + 1, "127.0.0.1", ports[4 * i], ports[4 * i + 1], ports[4 * i + 2], ports[4 * i + 3],
                           bind="127.0.0.1") for i in range(self.nodes)),
            self.dir, self.dir / "data", min(3, self.nodes), 1024, self.dir,
        )  # fmt: skip
        users = [(d, bcrypt_hash(s, 4)) for d, s in device_secrets.items()]
        files = write_nats_files(self.dir, [], self.conf, bcrypt_users=users)
        self.secrets = dict(device_secrets)
        for account in (SERVER_ACCOUNT, MONITOR_ACCOUNT, ADMIN_ACCOUNT):
            self.secrets[account] = read_secret(self.dir, account)
        return files

    @property
    def ca(self) -> str:
        return str(self.dir / "certs" / "ca.crt")

    def node(self, i: int) -> NatsNode:
        assert self.conf is not None, "call write_files() first"
        return self.conf.nodes[i - 1]

    def mqtt_ports(self) -> list[int]:
        assert self.conf is not None
        return [n.mqtt_port for n in self.conf.nodes]

    def urls(self) -> list[str]:
        assert self.conf is not None
        return device_urls(self.conf)

    def _spawn(self, i: int) -> None:
        binary = self.binary or find_nats_server()
        if not binary:
            raise FileNotFoundError("nats-server not found (apt-get install nats-server)")
        out = open(self.dir / f"nats-{i}.stdout", "ab")  # noqa: SIM115 - owned by the child
        self.procs[i] = subprocess.Popen([binary, "-c", str(self.dir / f"nats-{i}.conf")], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def start(self, timeout_s: float = 30.0) -> PrivateNatsCluster:
        assert self.conf is not None, "call write_files() first"
        for n in self.conf.nodes:
            self._spawn(n.index)
        self.wait_ready(timeout_s)
        self.warm_up(timeout_s)
        return self

    def mqtt_streams(self, i: int) -> set[str]:
        """Names of the `$MQTT_*` JetStream streams node i knows of."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.node(i).monitor_port}/jsz?streams=true",
                                        timeout=2) as r:  # fmt: skip
                doc = json.loads(r.read())
        except (OSError, ValueError):
            return set()
        names = set()
        for acc in doc.get("account_details") or []:
            for st in acc.get("stream_detail") or []:
                names.add(st.get("name", ""))
        return {n for n in names if n.startswith("$MQTT_")}

    def warm_up(self, timeout_s: float = 30.0) -> None:
        """NATS creates the account's MQTT streams (sessions, messages, retained) at the first MQTT
        connect, replicated; an exchange made while that runs was lost (field notes). So connect
        once with the monitor account and wait until the streams exist."""
        import ssl

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"koala-warmup-{os.getpid()}")
        c.username_pw_set(MONITOR_ACCOUNT, self.secrets[MONITOR_ACCOUNT])
        c.tls_set(ca_certs=self.ca, cert_reqs=ssl.CERT_REQUIRED)
        deadline = time.monotonic() + timeout_s
        try:
            c.connect("127.0.0.1", self.node(self.alive()[0]).mqtt_port, keepalive=30)
            c.loop_start()
            while len(self.mqtt_streams(self.alive()[0])) < 3:
                if time.monotonic() > deadline:
                    raise TimeoutError("the MQTT JetStream streams were not created")
                time.sleep(0.1)
        finally:
            c.disconnect()
            c.loop_stop()

    def alive(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None]

    def jsz(self, i: int) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.node(i).monitor_port}/jsz", timeout=2) as r:
            return json.loads(r.read())

    def meta_leader(self, i: int) -> str | None:
        try:
            return (self.jsz(i).get("meta_cluster") or {}).get("leader") or None
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout_s: float = 30.0, nodes: Sequence[int] | None = None) -> None:
        """Until every (given) live node accepts MQTT and sees a JetStream meta leader."""
        import socket

        deadline = time.monotonic() + timeout_s
        for i in nodes or self.alive():
            n = self.node(i)
            while True:
                p = self.procs[i]
                if p.poll() is not None:
                    raise RuntimeError(f"nats-{i} exited with {p.returncode}; see {self.dir}/nats-{i}.log")
                try:
                    socket.create_connection(("127.0.0.1", n.mqtt_port), timeout=0.5).close()
                    if self.meta_leader(i):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-{i}: no MQTT listener or no JetStream meta leader in {timeout_s:.0f} s")
                time.sleep(0.1)

    def kill_node(self, i: int) -> None:
        """SIGKILL (a crash: no clean shutdown, no leadership hand-over)."""
        p = self.procs[i]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def restart_node(self, i: int, timeout_s: float = 30.0) -> None:
        self.kill_node(i)
        self._spawn(i)
        self.wait_ready(timeout_s, nodes=[i])

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for i, p in self.procs.items():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                self.kill_node(i)

    def __enter__(self) -> PrivateNatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

