"""PUT /api/v1/rounds/schedule survives a server restart (stored in the registry, re-applied at start)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from server_app.api.app import create_app
from server_app.api.auth import AuthConfig
from server_app.registry import Registry, crud
from server_app.rounds.orchestrator import restore_schedule_policy

TOKEN = "t0ken-" + "z" * 26
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEFAULT = {"auto": True, "rounds": 10, "min_devices": 2, "interval_s": 0.0}


class Orch:
    """Stands in for RoundOrchestrator's schedule half (same ValueError on unknown keys)."""

    def __init__(self) -> None:
        self.policy = dict(DEFAULT)

    def schedule_policy(self) -> dict[str, Any]:
        return dict(self.policy)

    def set_schedule_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        if set(policy) - set(self.policy):
            raise ValueError("unknown keys")
        self.policy.update(policy)
        return dict(self.policy)


class Services:
    def __init__(self, registry: Registry, orchestrator: Orch) -> None:
        self.registry, self.orchestrator, self.settings = registry, orchestrator, None

    def start(self) -> None:
        restore_schedule_policy(self.registry, self.orchestrator)  # what ServerServices.start must do

    def stop(self) -> None: ...


def app_for(reg: Registry, orch: Orch):
    app = create_app(Services(reg, orch))
    app.state.auth = AuthConfig(token=TOKEN, open_reads_localhost=False)
    return app


def test_schedule_survives_a_restart(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'koala.db'}"
    reg = Registry(url)
    reg.upgrade()
    try:
        with TestClient(app_for(reg, Orch())) as c:
            r = c.put("/api/v1/rounds/schedule", json={"auto": False, "min_devices": 5}, headers=AUTH)
            assert r.status_code == 200 and r.json()["auto"] is False
    finally:
        reg.dispose()
    reg = Registry(url)  # "restart": new registry handle, fresh orchestrator with its defaults
    try:
        orch = Orch()
        with TestClient(app_for(reg, orch)) as c:
            got = c.get("/api/v1/rounds/schedule", headers=AUTH).json()
        assert got == {**DEFAULT, "auto": False, "min_devices": 5}
        with reg.session() as s:
            assert crud.get_setting(s, crud.SCHEDULE_POLICY)["min_devices"] == 5
    finally:
        reg.dispose()


def test_nothing_saved_changes_nothing_and_stale_keys_are_dropped(tmp_path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'koala.db'}")
    reg.upgrade()
    try:
        orch = Orch()
        assert restore_schedule_policy(reg, orch) is None and orch.policy == DEFAULT
        with reg.session() as s:
            crud.put_setting(s, crud.SCHEDULE_POLICY, {"rounds": 3, "retired_knob": 1})
        assert restore_schedule_policy(reg, orch)["rounds"] == 3
    finally:
        reg.dispose()
