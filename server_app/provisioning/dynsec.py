"""Mosquitto's dynamic-security plugin: per-device roles, checked at SUBSCRIBE time, changed live.

Why not the ACL file: Mosquitto 2.0.11's `acl_file` never checks subscriptions
(`security_default.c`: SUBSCRIBE -> success, "FIXME - implement ACL subscription strings") and
`$share/...` filters pass its `$`-topic check too. So a device could SUBSCRIBE to
`$share/koala-server/koala/v1/devices/+/up/result`, join the server's share group and be dealt a
share of every device's results, which the broker then drops at delivery (no `read` grant) after
the sender already has its PUBACK: results lost. The plugin checks the *literal* subscription
string (share prefix included) against `subscribePattern` grants, with every default access
denied, so that SUBACK is 0x80 and the device never joins any group. Measured in
tests/broker_config/test_isolation.py and docs/security.md.

The plugin keeps its state in DIR/dynamic-security.json and rewrites it (via `.new` + rename) on
every `$CONTROL` change. We generate that file from the registry for a cold start, and push live
changes (revoke = `deleteClient`, which disconnects the live session; add/rotate =
`createClient`/`setClientPassword`) through `BrokerControl` with the `koala-admin` account.

Passwords: the plugin stores PBKDF2-HMAC-SHA512 with a 12-byte salt, exactly what the `$7$`
password-file hash in the registry is, so the registry's hash converts without the clear secret.
"""

from __future__ import annotations

import json
import queue
import ssl
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from device_firmware_py.contract import topics
from server_app.provisioning.identity import ADMIN_ACCOUNT, MONITOR_ACCOUNT, SERVER_ACCOUNT, check_device_id

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",  # eclipse-mosquitto container image
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
DOCKER_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"
FILE_NAME = "dynamic-security.json"
P = topics.PREFIX


def find_plugin() -> str | None:
    for path in PLUGIN_CANDIDATES:
        if Path(path).is_file():
            return path
    return None


def device_role_name(device_id: str) -> str:
    return f"device:{device_id}"


def _acl(kind: str, topic: str, allow: bool = True, priority: int = 0) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": allow, "priority": priority}


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """Publish own uplink; subscribe/receive own downlink + broadcasts. Everything else: default deny.

    `subscribePattern` is matched against the whole SUBSCRIBE string: `$share/...`, `#`, `koala/#`,
    `koala/v1/devices/+/...` match none of these grants (a `+` in a subscription only matches a `+`
    in the grant), so they are refused with SUBACK 0x80.
    """
    check_device_id(device_id)
    out = [_acl("publishClientSend", t) for t in topics.acl_device_publish(device_id)]
    for t in topics.acl_device_read(device_id):
        out += [_acl("subscribePattern", t), _acl("publishClientReceive", t)]
    return out


def server_acls() -> list[dict[str, Any]]:
    """The server reads every uplink (plain or in any `$share` group of its own) and writes downlink."""
    reads = [*topics.acl_server_read(), f"{P}/server/#"]  # server/probe-*: the $share support probe
    out = [_acl("publishClientSend", t) for t in (*topics.acl_server_publish(), f"{P}/server/#")]
    for t in reads:
        out += [_acl("subscribePattern", t), _acl("subscribePattern", f"$share/+/{t}"), _acl("publishClientReceive", t)]
    return out


def monitor_acls() -> list[dict[str, Any]]:
    """Read everything under the prefix, never as a share group member (it would steal results)."""
    t = topics.filter_everything()
    return [_acl("subscribePattern", t), _acl("publishClientReceive", t)]


def admin_acls() -> list[dict[str, Any]]:
    return [
        _acl("publishClientSend", CONTROL_TOPIC),
        _acl("subscribePattern", RESPONSE_TOPIC),
        _acl("publishClientReceive", RESPONSE_TOPIC),
    ]


def _hash_fields(pw_hash: str) -> dict[str, Any]:
    """`$7$iterations$salt$hash` (password file) -> the plugin's {password, salt, iterations}."""
    try:
        _, kind, iters, salt, digest = pw_hash.split("$")
    except ValueError:
        raise ValueError("not a $7$ hash") from None
    if kind != "7":
        raise ValueError("not a $7$ hash")
    return {"password": digest, "salt": salt, "iterations": int(iters)}


def render_dynsec(devices: Iterable[tuple[str, str]], services: Iterable[tuple[str, str]]) -> str:
    """The plugin's JSON for (username, $7$ hash) devices and service accounts; stable for a stable input."""
    service_roles = {SERVER_ACCOUNT: server_acls(), MONITOR_ACCOUNT: monitor_acls(), ADMIN_ACCOUNT: admin_acls()}
    clients, roles = [], []
    for user, pw_hash in sorted(services):
        clients.append({"username": user, "textname": "service account", "roles": [{"rolename": user}],
                        "groups": [], **_hash_fields(pw_hash)})
        roles.append({"rolename": user, "acls": service_roles[user]})
    for device_id, pw_hash in sorted(devices):
        role = device_role_name(device_id)
        clients.append({"username": device_id, "textname": "device", "roles": [{"rolename": role}],
                        "clientid": topics.device_client_id(device_id), "groups": [], **_hash_fields(pw_hash)})
        roles.append({"rolename": role, "acls": device_acls(device_id)})
    doc = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


# ---- live changes over $CONTROL -------------------------------------------------------------------


class ControlError(RuntimeError):
    """The broker refused or did not answer a dynamic-security command."""


@dataclass(frozen=True)
class ControlEndpoint:
    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None

    @classmethod
    def from_url(cls, url: str, ca_file: str | None = None) -> ControlEndpoint:
        u = urlsplit(url)
        tls = u.scheme == "mqtts" or ca_file is not None
        return cls(u.hostname or "127.0.0.1", u.port or (8883 if tls else 1883), tls, ca_file)


def endpoint_from_conf(broker_dir: Path) -> ControlEndpoint | None:
    """Where a co-located admin reaches the broker rendered into `broker_dir`: the loopback plain
    listener if it has one, else its TLS listener on 127.0.0.1 (verified with the broker's CA)."""
    conf = broker_dir / "mosquitto.conf"
    if not conf.exists():
        return None
    listeners = [ln.split() for ln in conf.read_text().splitlines() if ln.startswith("listener ")]
    if len(listeners) >= 2 and len(listeners[1]) >= 2:  # the template renders TLS first, plain second
        host = listeners[1][2] if len(listeners[1]) > 2 and listeners[1][2] != "0.0.0.0" else "127.0.0.1"
        return ControlEndpoint(host, int(listeners[1][1]))
    if listeners and len(listeners[0]) >= 2:
        return ControlEndpoint("127.0.0.1", int(listeners[0][1]), True, str(broker_dir / "certs" / "ca.crt"))
    return None


class BrokerControl:
    """A short-lived admin connection that sends dynamic-security commands and waits for replies."""

    def __init__(self, endpoint: ControlEndpoint, username: str, password: str, timeout_s: float = 5.0) -> None:
        self.endpoint, self.username, self.password, self.timeout_s = endpoint, username, password, timeout_s

    @classmethod
    def for_broker_dir(cls, broker_dir: Path, endpoint: ControlEndpoint | None = None) -> BrokerControl:
        from server_app.provisioning.accounts import read_secret

        endpoint = endpoint or endpoint_from_conf(broker_dir)
        if endpoint is None:
            raise ControlError(f"no listener found in {broker_dir / 'mosquitto.conf'}")
        return cls(endpoint, ADMIN_ACCOUNT, read_secret(broker_dir, ADMIN_ACCOUNT))

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send the commands in one message; raise ControlError if any reply carries an error."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        replies: queue.Queue = queue.Queue()
        subscribed, connected = threading.Event(), threading.Event()
        rc_box: list[Any] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"koala-admin-{uuid.uuid4().hex[:8]}")
        c.username_pw_set(self.username, self.password)
        if self.endpoint.tls:
            c.tls_set(ca_certs=self.endpoint.ca_file, cert_reqs=ssl.CERT_REQUIRED)

        def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            rc_box.append(rc)
            connected.set()
            if not rc.is_failure:
                c.subscribe(RESPONSE_TOPIC, 1)

        def on_subscribe(_c: Any, _u: Any, _mid: Any, rcs: Any, _p: Any) -> None:
            if any(r.is_failure for r in rcs):
                rc_box.append("subscribe refused")
            subscribed.set()

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.on_message = lambda _c, _u, m: replies.put(m.payload)
        try:
            c.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        except OSError as exc:
            raise ControlError(f"broker control {self.endpoint.host}:{self.endpoint.port} unreachable: {exc}") from exc
        c.loop_start()
        try:
            if not connected.wait(self.timeout_s) or rc_box[0].is_failure:
                raise ControlError(f"broker refused the admin connection: {rc_box[:1]}")
            if not subscribed.wait(self.timeout_s) or "subscribe refused" in rc_box:
                raise ControlError("broker refused the admin's response subscription")
            c.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
            try:
                body = json.loads(replies.get(timeout=self.timeout_s))
            except queue.Empty:
                raise ControlError("no reply from the dynamic-security plugin (is it loaded?)") from None
            responses = body.get("responses", [])
            errors = [r for r in responses if r.get("error")]
            if errors:
                raise ControlError("; ".join(f"{r.get('command')}: {r.get('error')}" for r in errors))
            return responses
        finally:
            c.disconnect()
            c.loop_stop()

    # The operations provisioning needs; each disconnects live sessions of the user where it matters.
    def delete_client(self, username: str, missing_ok: bool = True) -> None:
        """Remove the credential; Mosquitto kicks every live session of that user at once."""
        try:
            self.run([{"command": "deleteClient", "username": username}])
        except ControlError as exc:
            if not (missing_ok and "not found" in str(exc).lower()):
                raise

    def disable_client(self, username: str) -> None:
        self.run([{"command": "disableClient", "username": username}])

    def enable_client(self, username: str) -> None:
        self.run([{"command": "enableClient", "username": username}])

    def upsert_device(self, device_id: str, secret: str) -> None:
        """Create the device with its role (idempotent), or set a new password (kicks old sessions)."""
        check_device_id(device_id)
        role = device_role_name(device_id)
        try:
            self.run([{"command": "createRole", "rolename": role, "acls": device_acls(device_id)}])
        except ControlError as exc:
            if "already exists" not in str(exc).lower():
                raise
        try:
            self.run([{"command": "createClient", "username": device_id, "password": secret,
                       "clientid": topics.device_client_id(device_id), "roles": [{"rolename": role}]}])
        except ControlError as exc:
            if "already exists" not in str(exc).lower():
                raise
            self.run([{"command": "setClientPassword", "username": device_id, "password": secret},
                      {"command": "setClientId", "username": device_id, "clientid": topics.device_client_id(device_id)},
                      {"command": "enableClient", "username": device_id}])

    def list_clients(self) -> list[str]:
        out = self.run([{"command": "listClients", "verbose": False, "count": -1, "offset": 0}])
        return list(out[0].get("data", {}).get("clients", []))


# ---- the server's side: REST revoke ---------------------------------------------------------------


def server_control(settings: Any) -> tuple[BrokerControl, Path] | None:
    """The admin control the API uses, from the server's settings, or None when not configured.

    Reads `settings.broker.provision_dir` (the `koala provision broker-files --out` directory: the
    `koala-admin` secret is in its secrets/, the broker files are refreshed there) and reaches the
    broker at `settings.broker.url` (+ `tls_ca`) like the server's own MQTT client.
    """
    broker = getattr(settings, "broker", None)
    raw = getattr(broker, "provision_dir", None)
    if raw is None or broker is None:
        return None
    from server_app.provisioning.accounts import read_secret

    broker_dir = Path(raw)
    endpoint = ControlEndpoint.from_url(broker.url, getattr(broker, "tls_ca", None))
    return BrokerControl(endpoint, ADMIN_ACCOUNT, read_secret(broker_dir, ADMIN_ACCOUNT)), broker_dir
