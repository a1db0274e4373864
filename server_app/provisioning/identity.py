"""Names that end up in broker files must be safe to paste there.

A device id becomes an MQTT username, a line in the ACL file and a topic level. A space would split
an ACL line, `+`/`#`/`/` would widen a topic grant to other devices, and a device named like a
service account would inherit its rights. So ids are validated once, here, before any file is
written.
"""

from __future__ import annotations

from device_firmware_py.contract.errors import ContractError
from device_firmware_py.contract.topics import validate_device_id

SERVER_ACCOUNT = "koala-server"
MONITOR_ACCOUNT = "koala-monitor"
# Sends dynamic-security commands ($CONTROL): revoke/add/rotate devices on the live broker.
ADMIN_ACCOUNT = "koala-admin"
SERVICE_ACCOUNTS = (SERVER_ACCOUNT, MONITOR_ACCOUNT, ADMIN_ACCOUNT)


class InvalidDeviceId(ValueError):
    """The id could be used to widen someone's broker rights; refuse it."""


def check_device_id(device_id: str) -> str:
    """Return `device_id` if it is a safe MQTT username and topic level (the contract's rule), else raise."""
    try:
        validate_device_id(device_id)
    except ContractError as exc:
        raise InvalidDeviceId(str(exc)) from None
    if device_id.lower().startswith("koala-"):
        raise InvalidDeviceId(
            f"device id {device_id!r}: the 'koala-' prefix is reserved for service accounts"
        )
    return device_id
