"""A private hardened Mosquitto (generated prod config, TLS + password + ACL) per test module."""

from __future__ import annotations

import pytest
from fleet_harness import start_fleet

from server_app.provisioning.local_broker import find_mosquitto


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed")
    f = start_fleet(tmp_path_factory.mktemp("hardened"), ["dev-a", "dev-b"])
    yield f
    f.broker.stop()
