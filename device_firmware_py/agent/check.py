"""`koala-device check --config FILE`: will this device's agent work? Each step ok / FAIL, with why and what to do.

Steps, in the order an agent needs them (a failed step skips the ones that depend on it):
config readable -> files (CA, password file, data, proxy + its sha256) -> TCP to the broker ->
TLS handshake (certificate trusted, host name) -> MQTT CONNECT with the device's credentials and its
bound client id (`koala-dev-<id>`) -> SUBSCRIBE to its own down topics granted -> the server's
retained status seen. Exit 0 only when every step passes.

The check connects as the device (a hardened broker accepts only that client id), so it would take
the MQTT session over from a running agent: it refuses while the agent's local endpoint answers,
unless --force. It keeps the agent's persistent session intact: clean_session=False and nothing it
receives is acknowledged, so a queued assignment is delivered again to the agent.
Device-side code: stdlib + paho only (no torch, no server imports).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading
import time
from typing import Any

HELP = "check this device's setup: config, files, TLS, credentials, broker ACL and the server (ok / FAIL per step)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="device config file (.json or .toml); KOALA_DEVICE_* env overrides")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per network step (default 5)")
    p.add_argument("--force", action="store_true", help="check even while the agent runs (it is disconnected once)")


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def ok(self, step: str, detail: str) -> None:
        print(f"ok    {step:<11} {detail}", flush=True)

    def fail(self, step: str, why: str, todo: str) -> None:
        self.failed += 1
        print(f"FAIL  {step:<11} {why}\n      {'':<11} -> {todo}", flush=True)

    def skip(self, step: str, why: str) -> None:
        print(f"--    {step:<11} skipped: {why}", flush=True)


def run(args: argparse.Namespace) -> int:
    from device_firmware_py.config import ConfigError, DeviceConfig

    r = Report()
    later = ("tcp", "tls", "mqtt", "subscribe", "server")
    try:
        cfg = DeviceConfig.load(args.config)
    except (ConfigError, OSError, ValueError) as exc:
        r.fail("config", f"{args.config}: {exc}", "fix the file (keys: docs/device-serving.md, deploy/fleet.example.yml)")
        for s in ("files", *later):
            r.skip(s, "no config")
        return 1
    r.ok("config", f"{args.config}: device {cfg.device_id}, broker {cfg.broker_url}, client id {cfg.mqtt_client_id}")
    bad = _files(cfg, r)
    if not args.force and _agent_running(cfg):
        r.fail("agent", f"the agent is running (its endpoint {cfg.socket_path} answers): a check would take its "
               "MQTT session over", "stop it first (systemctl stop koala-device), or pass --force")  # fmt: skip
        return 1
    if bad & {"ca_file", "password"}:
        for s in later:
            r.skip(s, f"fix {' and '.join(sorted(bad & {'ca_file', 'password'}))} first")
        return 1
    sock = _tcp(cfg, r, args.timeout)
    if sock is None:
        for s in later[1:]:
            r.skip(s, "no TCP connection")
        return 1
    sock.close()
    if cfg.tls:
        if not _tls(cfg, r, args.timeout):
            for s in later[2:]:
                r.skip(s, "no TLS")
            return 1
    else:
        r.ok("tls", f"not used ({cfg.broker_url}: mqtt://, password and data travel in clear; production brokers use mqtts://)")
    _mqtt(cfg, r, args.timeout)
    print("all checks passed" if not r.failed else f"{r.failed} check(s) failed", flush=True)
    return 0 if not r.failed else 1


def _files(cfg: Any, r: Report) -> set[str]:
    """Check the files the config names; the names of the failed steps."""
    from pathlib import Path

    from device_firmware_py.config import file_sha256

    bad: set[str] = set()
    if cfg.tls:
        if not cfg.ca_file:
            r.ok("ca_file", "not set: the system's CA store verifies the broker")
        elif not Path(cfg.ca_file).is_file():
            bad.add("ca_file")
            r.fail("ca_file", f"CA file {cfg.ca_file} not found (ca_file in {args_source(cfg)})",
                   "copy the fleet's ca.crt there (the bundle ships it: etc/koala/ca.crt) or fix ca_file")  # fmt: skip
        else:
            try:
                ssl.create_default_context(cafile=cfg.ca_file)
                r.ok("ca_file", f"{cfg.ca_file}")
            except (ssl.SSLError, ValueError) as exc:
                bad.add("ca_file")
                r.fail("ca_file", f"{cfg.ca_file} is no PEM certificate ({exc})", "copy the fleet's ca.crt there")
    if cfg.password_file:
        try:
            secret = Path(cfg.password_file).read_text().strip()
            if secret:
                r.ok("password", f"{cfg.password_file} (user {cfg.username or '(none)'})")
            else:
                bad.add("password")
                r.fail("password", f"{cfg.password_file} is empty", "re-flash the bundle or `koala provision rotate` it")
        except OSError as exc:
            bad.add("password")
            r.fail("password", f"password file {cfg.password_file} not readable: {exc.strerror} "
                   f"(password_file in {args_source(cfg)})", "re-flash the device's bundle (it holds the file)")  # fmt: skip
    paths = ([("data_path", cfg.data_path)] if cfg.data_source == "file" else []) + [("proxy_path", cfg.proxy_path)]
    for key, p in paths:
        if not Path(p).is_file():
            bad.add(key)
            r.fail(key, f"{p} not found ({key} in {args_source(cfg)})",
                   "put the file there (`koala data prepare` cuts them; a bundle ships the proxy set)")  # fmt: skip
        elif key == "proxy_path" and cfg.proxy_sha256:
            got = file_sha256(p)
            if got != cfg.proxy_sha256:
                bad.add(key)
                r.fail(key, f"{p} sha256 {got[:12]} != configured proxy_sha256 {cfg.proxy_sha256[:12]}",
                       "this is not the server's proxy set: copy the bundle's proxy file again")  # fmt: skip
            else:
                r.ok(key, f"{p} (sha256 {got[:12]} matches)")
        else:
            r.ok(key, str(p))
    return bad


def args_source(cfg: Any) -> str:
    return getattr(cfg, "source", "") or "the device config"


def _agent_running(cfg: Any) -> bool:
    import os

    path = cfg.socket_path
    if not path or not os.path.exists(path):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(path)
        return True
    except OSError:
        return False


def _tcp(cfg: Any, r: Report, timeout: float) -> socket.socket | None:
    from device_firmware_py.mqtt import connect_error_reason

    try:
        s = socket.create_connection((cfg.host, cfg.port), timeout=timeout)
    except OSError as exc:
        r.fail("tcp", f"{cfg.host}:{cfg.port}: {connect_error_reason(exc)}",
               "check broker_url (host, port: mqtts is 8883 unless the fleet chose another), the network, the broker")  # fmt: skip
        return None
    r.ok("tcp", f"{cfg.host}:{cfg.port} reachable")
    return s


def _tls(cfg: Any, r: Report, timeout: float) -> bool:
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    try:
        with socket.create_connection((cfg.host, cfg.port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=cfg.host) as tls:  # fmt: skip
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        msg = exc.verify_message or str(exc)
        todo = (f"the broker's certificate does not name {cfg.host}: use the host name it was issued for in "
                "broker_url, or re-issue it with that name (fleet.yml broker.tls_hosts)") if "hostname" in msg.lower() \
            else "ca_file must be the fleet's CA (the one that signed the broker's certificate)"  # fmt: skip
        r.fail("tls", f"certificate not accepted: {msg}", todo)
        return False
    except (ssl.SSLError, OSError) as exc:
        r.fail("tls", f"TLS handshake failed: {exc}", "is this port the broker's TLS listener (mqtts://, 8883)?")
        return False
    r.ok("tls", f"{version}, certificate trusted, host name {cfg.host} matches")
    return True


def _mqtt(cfg: Any, r: Report, timeout: float) -> None:
    import paho.mqtt.client as mqtt

    from device_firmware_py.contract import codec, topics

    state: dict[str, Any] = {}
    connected, subscribed, status = threading.Event(), threading.Event(), threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        state["rc"] = rc
        connected.set()

    def on_subscribe(_c: Any, _u: Any, _m: Any, rcs: Any, _p: Any = None) -> None:
        state["sub"] = list(rcs)
        subscribed.set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:  # never acknowledged: the agent gets it again
        if msg.topic == topics.server_status() and msg.payload:
            try:
                state["status"] = codec.decode_for_topic(msg.topic, bytes(msg.payload))[1].scalar_fields()
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                state["status"] = {"state": f"undecodable ({exc})"}
            status.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.mqtt_client_id, clean_session=False,
                    protocol=mqtt.MQTTv311, manual_ack=True)  # fmt: skip
    if cfg.username:
        c.username_pw_set(cfg.username, cfg.secret() or None)
    if cfg.tls:
        c.tls_set(ca_certs=cfg.ca_file or None, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    try:
        c.connect(cfg.host, cfg.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        r.fail("mqtt", f"connect: {exc}", "see the tcp / tls steps above")
        return
    c.loop_start()
    try:
        if not connected.wait(timeout):
            r.fail("mqtt", f"no CONNACK within {timeout:g} s", "is this port an MQTT broker?")
            return
        rc = state["rc"]
        if getattr(rc, "is_failure", False):
            r.fail("mqtt", f"CONNECT refused: {rc} (user {cfg.username or '(none)'}, client id {cfg.mqtt_client_id})",
                   "the username / password do not match the broker's (re-flash the bundle, or `koala provision "
                   "rotate` the device); a hardened broker also binds the client id to the device")  # fmt: skip
            return
        r.ok("mqtt", f"CONNECT accepted: user {cfg.username or '(none)'}, client id {cfg.mqtt_client_id}")
        want = [(topics.device_assign(cfg.device_id), 1), (topics.device_verdict(cfg.device_id), 1),
                (topics.server_status(), 1)]  # fmt: skip
        c.subscribe(want)
        if not subscribed.wait(timeout):
            r.fail("subscribe", f"no SUBACK within {timeout:g} s", "the broker dropped the connection: see its log")
            return
        refused = [f for (f, _q), rc in zip(want, state["sub"], strict=False) if getattr(rc, "is_failure", False)]
        if refused:
            r.fail("subscribe", f"refused: {' '.join(refused)}", "the broker's ACL does not grant this device its "
                   "topics: regenerate the broker files (`koala provision fleet`) and reload the broker")  # fmt: skip
            return
        r.ok("subscribe", "granted: " + " ".join(f for f, _ in want))
        if not status.wait(timeout):
            r.fail("server", f"no retained {topics.server_status()} within {timeout:g} s",
                   "the KOALA server has never connected to this broker: start `koala serve` (same broker)")  # fmt: skip
            return
        st = state["status"]
        if st.get("state") != "online":
            r.fail("server", f"server status: {st.get('state')}", "start the server (`koala serve`), then check again")
            return
        r.ok("server", f"online (version {st.get('version', '?')})")
    finally:
        if subscribed.is_set():  # the agent's persistent session keeps its own topics only
            unsubscribed = threading.Event()
            c.on_unsubscribe = lambda *_a: unsubscribed.set()
            c.unsubscribe(topics.server_status())
            unsubscribed.wait(timeout)
        c.disconnect()
        c.loop_stop()
        time.sleep(0.05)
        sys.stdout.flush()
