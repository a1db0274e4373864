"""`POST /api/v1/devices/{id}/revoke` cuts the device off at a real broker within seconds.

The server is configured as in production: `broker.url` (+ tls_ca) and `broker.provision_dir`
(the `koala provision broker-files` directory holding the koala-admin secret). Settings are a plain
namespace here because `provision_dir` is a new setting (see docs/security.md).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from fleet_harness import needs_mosquitto, start_fleet
from mqtt_probe import Probe, Refused

from server_app.api.app import create_app
from server_app.api.auth import AuthConfig
from server_app.registry import Registry, crud

TOKEN = "t0ken-" + "y" * 26
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Services:
    def __init__(self, registry: Registry, settings: object) -> None:
        self.registry, self.settings, self.orchestrator = registry, settings, None

    def start(self) -> None: ...
    def stop(self) -> None: ...


@needs_mosquitto
def test_rest_revoke_disconnects_the_live_session(tmp_path) -> None:
    fleet = start_fleet(tmp_path, ["dev-a", "dev-b"])
    reg = Registry(f"sqlite:///{tmp_path / 'koala.db'}")
    reg.upgrade()
    try:
        with reg.session() as s:
            for d in ("dev-a", "dev-b"):
                crud.register_device(s, d, arch="cnn_small", credentials_hash=fleet._hashes[d])
        settings = SimpleNamespace(
            broker=SimpleNamespace(
                url=f"mqtt://127.0.0.1:{fleet.broker.plain_port}", tls_ca=None, provision_dir=str(fleet.broker.broker_dir)
            ),
            api=SimpleNamespace(bearer_token=None, open_reads_localhost=False),
        )
        app = create_app(Services(reg, settings))
        app.state.auth = AuthConfig(token=TOKEN, open_reads_localhost=False)
        live = Probe(fleet.broker.tls_port, "dev-a", fleet.secrets["dev-a"], ca_file=fleet.ca).connect()
        with TestClient(app) as c:
            t0 = time.monotonic()
            r = c.post("/api/v1/devices/dev-a/revoke", headers=AUTH)
            assert r.status_code == 200, r.text
            assert live.disconnected.wait(5.0)
            elapsed = time.monotonic() - t0
            print(f"REST revoke -> disconnect: {elapsed * 1000:.0f} ms")
            assert elapsed < 3.0
            live.client.loop_stop()
            with pytest.raises(Refused):
                Probe(fleet.broker.tls_port, "dev-a", fleet.secrets["dev-a"], ca_file=fleet.ca).connect()
            Probe(fleet.broker.tls_port, "dev-b", fleet.secrets["dev-b"], ca_file=fleet.ca).connect().close()
            # the regenerated files agree: a broker restart does not revive dev-a
            assert '"dev-a"' not in (fleet.broker.broker_dir / "dynamic-security.json").read_text()
            with reg.session() as s:
                assert crud.get_device(s, "dev-a").revoked
            # an unreachable broker: 503 and the registry is unchanged
            fleet.broker.stop()
            r = c.post("/api/v1/devices/dev-b/revoke", headers=AUTH)
            assert r.status_code == 503
            with reg.session() as s:
                assert not crud.get_device(s, "dev-b").revoked
    finally:
        fleet.broker.stop()
        reg.dispose()


def test_rest_revoke_without_broker_settings_is_registry_only(tmp_path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'koala.db'}")
    reg.upgrade()
    try:
        with reg.session() as s:
            crud.register_device(s, "dev-x", arch="cnn_small")
        app = create_app(Services(reg, None))
        app.state.auth = AuthConfig(token=TOKEN, open_reads_localhost=False)
        with TestClient(app) as c:
            assert c.post("/api/v1/devices/dev-x/revoke", headers=AUTH).status_code == 200
    finally:
        reg.dispose()
