"""The only place provisioning touches the SQL registry (through `server_app.registry.crud`).

What provisioning needs from it is small: register a device with its credentials hash, replace
the hash (rotate), mark it revoked, and list the active devices' hashes to write broker files.
The plain secret never reaches the database: only the Mosquitto `$7$` hash is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from server_app.provisioning.broker_files import DeviceCredential

T = TypeVar("T")
_MIGRATED: set[str] = set()  # URLs already brought to head by this process (Alembic is slow to load)


class UnknownDevice(LookupError):
    pass


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    arch: str | None
    revoked: bool
    has_credentials: bool


@contextmanager
def _registry(db_url: str) -> Iterator[Any]:
    from server_app.registry.session import Registry

    reg = Registry(db_url)
    try:
        if reg.url not in _MIGRATED:
            reg.upgrade()  # Alembic: creates or migrates the schema; a no-op when at head
            _MIGRATED.add(reg.url)
        yield reg
    finally:
        reg.dispose()


def _run(db_url: str, fn: Callable[..., T], *args: Any) -> T:
    from server_app.registry.errors import NotFound

    with _registry(db_url) as reg:
        try:
            return reg.run(fn, *args)
        except NotFound as exc:
            raise UnknownDevice(f"device {args[0]!r} is not registered") from exc


def register_device(db_url: str, device_id: str, arch: str, pw_hash: str) -> None:
    """Create the device (or re-activate a revoked one) with a fresh credentials hash."""
    from server_app.registry import crud

    def op(s: Any, device_id: str) -> None:
        crud.register_device(s, device_id, arch=arch, credentials_hash=pw_hash)
        crud.revoke_device(s, device_id, revoked=False)

    _run(db_url, op, device_id)


def set_credentials(db_url: str, device_id: str, pw_hash: str) -> None:
    from server_app.registry import crud

    def op(s: Any, device_id: str) -> None:
        crud.get_device(s, device_id).credentials_hash = pw_hash

    _run(db_url, op, device_id)


def revoke_device(db_url: str, device_id: str) -> None:
    """Mark revoked and forget the hash: even restoring an old password file cannot revive it."""
    from server_app.registry import crud

    def op(s: Any, device_id: str) -> None:
        crud.revoke_device(s, device_id).credentials_hash = None

    _run(db_url, op, device_id)


def get_device(db_url: str, device_id: str) -> DeviceRecord:
    from server_app.registry import crud

    def op(s: Any, device_id: str) -> DeviceRecord:
        d = crud.get_device(s, device_id)
        return DeviceRecord(d.id, d.arch, bool(d.revoked), bool(d.credentials_hash))

    return _run(db_url, op, device_id)


def active_credentials(db_url: str) -> list[DeviceCredential]:
    """Every non-revoked device that has credentials: exactly who may connect to the broker."""
    from server_app.registry import crud

    def page_op(s: Any) -> list[DeviceCredential]:
        out, offset = [], 0
        while True:
            page = crud.list_devices(s, limit=crud.MAX_PAGE, offset=offset)
            out += [DeviceCredential(d.id, d.credentials_hash) for d in page if d.credentials_hash]
            if len(page) < crud.MAX_PAGE:
                return out
            offset += len(page)

    with _registry(db_url) as reg:
        return reg.run(page_op)
