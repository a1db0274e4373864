"""Write everything a hardened Mosquitto needs into one directory, and reload a running one.

Layout of DIR (what `mosquitto.conf` in it points to):
    mosquitto.conf            rendered from broker_config/mosquitto.prod.conf (if asked)
    dynamic-security.json     what the broker enforces: accounts ($7$ hashes converted) + roles;
                              the broker owns it once running (rewrites it on $CONTROL changes)
    passwd                    `user:$7$...` for active devices + service accounts (audit list;
                              the generated mosquitto.conf does not load it)
    acl                       per-user topic grants from the topic contract (audit list, same)
    certs/ca.crt, ca.key      the private CA (ca.key stays here; bundles get ca.crt only)
    certs/server.crt, .key    the broker's certificate (SANs: localhost, 127.0.0.1, --tls-host)
    secrets/*.password        service-account secrets (0600)
Files are replaced atomically (write + rename) so a broker reloading mid-write never reads half
a file; the password file holds only hashes of 256-bit random secrets, the ACL no secrets at all,
so both are 0644 (Mosquitto may read them after dropping root).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from server_app.provisioning import acl, dynsec, tls
from server_app.provisioning.accounts import ensure_service_accounts
from server_app.provisioning.broker_conf import BrokerConf, render
from server_app.provisioning.identity import check_device_id
from server_app.provisioning.passwords import render_password_file


@dataclass(frozen=True)
class DeviceCredential:
    """What the broker needs to know about one active (not revoked) device."""

    device_id: str
    pw_hash: str


@dataclass(frozen=True)
class BrokerFiles:
    dir: Path
    passwd: Path
    acl: Path
    ca_cert: Path
    dynsec: Path
    conf: Path | None
    changed: bool


def atomic_write(path: Path, text: str, mode: int = 0o644) -> bool:
    """Replace `path` with `text` in one rename; returns False (and writes nothing) if unchanged."""
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def ensure_pki(broker_dir: Path, tls_hosts: list[str] | None = None) -> Path:
    """Create the CA and the broker's server certificate once; return the CA certificate path.

    An existing CA is kept (re-creating it would orphan every flashed device). The server
    certificate is re-issued only when asked for host names it does not yet cover.
    """
    certs = broker_dir / "certs"
    ca_crt, ca_key = certs / "ca.crt", certs / "ca.key"
    if not ca_crt.exists():
        tls.write_pair(tls.make_ca(), ca_crt, ca_key)
    srv_crt, srv_key = certs / "server.crt", certs / "server.key"
    hosts_file = certs / "server.hosts"
    wanted = sorted(set(tls_hosts or []))
    have = hosts_file.read_text().split() if hosts_file.exists() else None
    if not srv_crt.exists() or (have is not None and not set(wanted) <= set(have)):
        merged = sorted(set(wanted) | set(have or []))
        tls.write_pair(tls.make_server_cert(tls.load_pair(ca_crt, ca_key), merged), srv_crt, srv_key)
        hosts_file.write_text(" ".join(merged) + "\n")
    return ca_crt


def write_broker_files(
    broker_dir: Path,
    devices: Iterable[DeviceCredential],
    conf: BrokerConf | None = None,
    tls_hosts: list[str] | None = None,
) -> BrokerFiles:
    """(Re)generate password, ACL, PKI and optionally the broker config for the given devices."""
    broker_dir.mkdir(parents=True, exist_ok=True)
    devices = sorted(devices, key=lambda d: d.device_id)
    for d in devices:
        check_device_id(d.device_id)
    ca = ensure_pki(broker_dir, tls_hosts)
    services = ensure_service_accounts(broker_dir)
    entries = [(s.username, s.pw_hash) for s in services] + [(d.device_id, d.pw_hash) for d in devices]
    changed = atomic_write(broker_dir / "passwd", render_password_file(entries))
    changed |= atomic_write(broker_dir / "acl", acl.render_acl([d.device_id for d in devices]))
    ds_path = broker_dir / dynsec.FILE_NAME
    ds_text = dynsec.render_dynsec([(d.device_id, d.pw_hash) for d in devices], entries[: len(services)])
    # Hashes only (0644 like passwd: a containerised broker runs as another uid). A running broker
    # keeps its in-memory state (live changes go over $CONTROL) and loads this file at its next start.
    changed |= atomic_write(ds_path, ds_text)
    conf_path = None
    if conf is not None:
        conf_path = broker_dir / "mosquitto.conf"
        changed |= atomic_write(conf_path, render(conf))
    return BrokerFiles(broker_dir, broker_dir / "passwd", broker_dir / "acl", ca, ds_path, conf_path, changed)


def reload_broker(pid_file: Path) -> int:
    """SIGHUP the Mosquitto whose pid is in `pid_file` (re-reads its config and certificates).

    With the generated config the accounts live in the dynamic-security plugin, which a SIGHUP
    does not reload: live account changes go through `dynsec.BrokerControl` instead.
    """
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGHUP)
    return pid


def cut_off(control: dynsec.BrokerControl, broker_dir: Path | None, device_id: str, active: list[DeviceCredential]) -> None:
    """Delete the device on the live broker (its sessions are dropped at once) and, when the broker
    files live here, regenerate them from `active` (DeviceCredential list) so a restart agrees."""
    control.delete_client(device_id)
    with contextlib.suppress(dynsec.ControlError):  # no such role: nothing to tidy
        control.run([{"command": "deleteRole", "rolename": dynsec.device_role_name(device_id)}])
    if broker_dir is not None:
        write_broker_files(broker_dir, active)
