"""The only place provisioning touches the SQL registry.

What provisioning needs from it is small: register a device with its credentials hash, replace
the hash (rotate), mark it revoked, and list the active devices' hashes to write broker files.
The plain secret never reaches the database: only the Mosquitto `$7$` hash is stored.

NOTE: written against `server_app.registry.models.Device` directly because the registry's crud
module had not landed when this was written; switch these bodies to its crud functions when it
does (the signatures below are what the CLI depends on).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from server_app.provisioning.broker_files import DeviceCredential


class UnknownDevice(LookupError):
    pass


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    arch: str | None
    revoked: bool
    has_credentials: bool


@contextmanager
def _session(db_url: str) -> Iterator[object]:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from server_app.registry.models import Base

    engine = create_engine(db_url)
    Base.metadata.create_all(engine)  # no-op on a migrated database
    try:
        with Session(engine) as session, session.begin():
            yield session
    finally:
        engine.dispose()


def _get(session, device_id: str):  # noqa: ANN001, ANN202 - Session/Device imported lazily
    from server_app.registry.models import Device

    row = session.get(Device, device_id)
    if row is None:
        raise UnknownDevice(f"device {device_id!r} is not registered")
    return row


def register_device(db_url: str, device_id: str, arch: str, pw_hash: str) -> None:
    """Create the device (or re-activate a revoked one) with a fresh credentials hash."""
    from server_app.registry.models import Device

    with _session(db_url) as s:
        row = s.get(Device, device_id)
        if row is None:
            s.add(Device(id=device_id, arch=arch, credentials_hash=pw_hash, revoked=False))
        else:
            row.arch, row.credentials_hash, row.revoked = arch, pw_hash, False


def set_credentials(db_url: str, device_id: str, pw_hash: str) -> None:
    with _session(db_url) as s:
        _get(s, device_id).credentials_hash = pw_hash


def revoke_device(db_url: str, device_id: str) -> None:
    """Mark revoked and forget the hash: even restoring an old password file cannot revive it."""
    with _session(db_url) as s:
        row = _get(s, device_id)
        row.revoked, row.credentials_hash = True, None


def get_device(db_url: str, device_id: str) -> DeviceRecord:
    with _session(db_url) as s:
        row = _get(s, device_id)
        return DeviceRecord(row.id, row.arch, bool(row.revoked), bool(row.credentials_hash))


def active_credentials(db_url: str) -> list[DeviceCredential]:
    """Every non-revoked device that has credentials: exactly who may connect to the broker."""
    from sqlalchemy import select

    from server_app.registry.models import Device

    with _session(db_url) as s:
        rows = s.scalars(select(Device).where(Device.revoked.is_(False), Device.credentials_hash.is_not(None)))
        return [DeviceCredential(r.id, r.credentials_hash) for r in rows]
