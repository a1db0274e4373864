"""Topic filters per account kind, taken from the wire contract (the only topic source).

PROVISIONAL: `device_firmware_py.contract.topics` has not landed yet; until it does these filters
are spelled out from docs/architecture.md. Swap the bodies for calls into `topics` when it lands.
"""

from __future__ import annotations

PREFIX = "koala/v1"


def device_publishes(device_id: str) -> list[str]:
    base = f"{PREFIX}/devices/{device_id}"
    return [f"{base}/status", f"{base}/up/result", f"{base}/up/progress"]


def device_reads(device_id: str) -> list[str]:
    return [f"{PREFIX}/devices/{device_id}/down/#", f"{PREFIX}/rounds/#", f"{PREFIX}/server/status"]


def server_reads() -> list[str]:
    return [
        f"{PREFIX}/devices/+/status",
        f"{PREFIX}/devices/+/up/#",
        f"{PREFIX}/rounds/#",
        f"{PREFIX}/server/status",
    ]


def server_publishes() -> list[str]:
    return [f"{PREFIX}/devices/+/down/#", f"{PREFIX}/rounds/#", f"{PREFIX}/server/status"]


def everything() -> str:
    return f"{PREFIX}/#"
