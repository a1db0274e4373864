"""Start a private hardened Mosquitto (generated prod config) with a small fleet of accounts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from server_app.provisioning.accounts import read_secret
from server_app.provisioning.broker_files import DeviceCredential
from server_app.provisioning.identity import ADMIN_ACCOUNT, MONITOR_ACCOUNT, SERVER_ACCOUNT
from server_app.provisioning.local_broker import PrivateMosquitto, find_mosquitto
from server_app.provisioning.passwords import mosquitto_hash, new_secret

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed")


@dataclass
class Fleet:
    broker: PrivateMosquitto
    secrets: dict[str, str]  # username -> clear secret (devices and service accounts)

    @property
    def ca(self) -> str:
        return str(self.broker.broker_dir / "certs" / "ca.crt")

    def control(self):
        from server_app.provisioning.dynsec import BrokerControl

        return BrokerControl.for_broker_dir(self.broker.broker_dir)

    def revoke(self, device_id: str) -> None:
        """Regenerate files without `device_id` and delete it on the live broker, as `koala provision revoke`."""
        del self.secrets[device_id]
        self.broker.write_files(self._credentials())
        self.control().delete_client(device_id)

    def _credentials(self) -> list[DeviceCredential]:
        return [DeviceCredential(u, self._hashes[u]) for u in self.secrets if not u.startswith("koala-")]

    _hashes: dict[str, str] = None  # type: ignore[assignment]


def start_fleet(tmp: Path, device_ids: list[str]) -> Fleet:
    secrets = {d: new_secret() for d in device_ids}
    broker = PrivateMosquitto(tmp / "broker")
    fleet = Fleet(broker, secrets)
    fleet._hashes = {d: mosquitto_hash(s) for d, s in secrets.items()}
    broker.write_files(fleet._credentials())
    for account in (SERVER_ACCOUNT, MONITOR_ACCOUNT, ADMIN_ACCOUNT):
        secrets[account] = read_secret(broker.broker_dir, account)
    broker.start()
    return fleet
