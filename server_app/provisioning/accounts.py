"""Service accounts: the server (ingests results, dispatches assignments) and a read-only monitor.

They are not devices, so they are not in the device registry. Their plain secrets live in the
broker directory under `secrets/` (0600): the server process needs its password in clear text to
connect, exactly as a device does. The stored `$7$` hash is kept next to it so regenerating the
password file is stable (no new salt, no spurious broker reload).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from server_app.provisioning.identity import SERVICE_ACCOUNTS
from server_app.provisioning.passwords import mosquitto_hash, new_secret, verify, write_secret_file


@dataclass(frozen=True)
class ServiceAccount:
    username: str
    pw_hash: str
    secret_file: Path


def secret_path(broker_dir: Path, username: str) -> Path:
    return broker_dir / "secrets" / f"{username}.password"


def read_secret(broker_dir: Path, username: str) -> str:
    """The clear secret of a service account (for the server's own MQTT client)."""
    return secret_path(broker_dir, username).read_text().strip()


def ensure_service_accounts(broker_dir: Path, rotate: tuple[str, ...] = ()) -> list[ServiceAccount]:
    """Create missing service secrets (or rotate the named ones) and return their hashes."""
    hashes_file = broker_dir / "secrets" / "service-accounts.json"
    hashes: dict[str, str] = json.loads(hashes_file.read_text()) if hashes_file.exists() else {}
    out = []
    for name in SERVICE_ACCOUNTS:
        path = secret_path(broker_dir, name)
        if name in rotate or not path.exists():
            write_secret_file(path, new_secret())
        secret = path.read_text().strip()
        if name not in hashes or not verify(secret, hashes[name]):
            hashes[name] = mosquitto_hash(secret)
        out.append(ServiceAccount(name, hashes[name], path))
    fd = os.open(hashes_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(hashes, fh, indent=1, sort_keys=True)
    return out
