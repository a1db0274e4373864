"""Revoking a device (files regenerated without it + SIGHUP) locks it out of a running broker."""

from __future__ import annotations

import pytest
from fleet_harness import needs_mosquitto, start_fleet
from mqtt_probe import WAIT_S, Probe, Refused


@needs_mosquitto
def test_revoked_device_cannot_connect_and_is_dropped(tmp_path) -> None:
    fleet = start_fleet(tmp_path, ["dev-a", "dev-b"])
    try:
        secret_a = fleet.secrets["dev-a"]
        connected = Probe(fleet.broker.tls_port, "dev-a", secret_a, ca_file=fleet.ca).connect()
        fleet.revoke("dev-a")
        # Mosquitto 2.0 re-checks live clients on reload: the open session is closed too.
        assert connected.disconnected.wait(WAIT_S)
        connected.client.loop_stop()
        with pytest.raises(Refused):
            Probe(fleet.broker.tls_port, "dev-a", secret_a, ca_file=fleet.ca).connect()
        assert "dev-a" not in fleet.broker.files.passwd.read_text()
        assert "user dev-a" not in fleet.broker.files.acl.read_text()
        # the rest of the fleet is untouched
        Probe(fleet.broker.tls_port, "dev-b", fleet.secrets["dev-b"], ca_file=fleet.ca).connect().close()
    finally:
        fleet.broker.stop()
