"""Security on the server side: per-device submission limit, token on every mutating REST route,
no secret in the logs.

(Broker ACLs that stop cross-device publishes are tested with the provisioning/broker_config tests;
the server-side "topic id must equal payload id" check is in test_bad_publishes.py.)
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rel_helpers import RawPublisher, server_options, wait_for
from rel_simdev import (
    SimFleet,
    canned_logits,
    result_frame,  # noqa: I001 - keep the helper imports together
)
from test_bad_publishes import reframe

from device_firmware_py.contract import topics

FLOOD = 30


def test_result_flood_from_one_device_is_rate_limited(broker, digits_files, tmp_path, inproc_server, db_reader):
    """A device (its own topic, which an ACL allows) floods garbage: only its result budget of the
    round (8 messages) reaches validation and the registry; the rest is dropped on the MQTT thread
    before decoding, counted per device, and leaves one `over_budget` event (server_app.ingest_budget)."""
    db_url = f"sqlite:///{tmp_path / 'koala.db'}"
    fleet = SimFleet("127.0.0.1", broker.port, ["f0", "f1"], behaviour=lambda d, r: "silent").start()
    services = inproc_server(server_options(db_url, tmp_path / "server", digits_files, broker.port, rounds=1,
                                            min_devices=2, deadline_s=300.0))  # fmt: skip
    db = db_reader(db_url)
    raw = RawPublisher("127.0.0.1", broker.port, "rel-flood")
    budget = services.options.budgets.results_per_round
    try:
        wait_for(lambda: ("f0", 0) in fleet.assigned, 120, "assignment")
        good = result_frame("f0", fleet.assigned[("f0", 0)])
        bad = canned_logits((200, 10)).astype("<f2")
        bad[0, 0] = np.nan
        nan_frame = reframe(good, body=bad.tobytes())
        for _ in range(FLOOD):
            raw.publish(topics.device_result("f0"), nan_frame)
        wait_for(lambda: services.budget.dropped[("result", "f0")] + sum(services.ingestor.counts.values()) >= FLOOD,
                 60, "the flood to be handled")  # fmt: skip
        wait_for(lambda: any(r["reason"] == "over_budget" for r in db.rejections()), 30, "the over-budget event")
    finally:
        raw.close()
        fleet.stop()
    reasons = [r["reason"] for r in db.rejections() if r["device_id"] == "f0"]
    assert reasons == ["nan_or_inf"] * budget + ["over_budget"]
    assert services.budget.dropped[("result", "f0")] == FLOOD - budget
    assert sum(services.ingestor.counts.values()) == budget  # decoded and validated: the budget only
    print(f"\nRELIABILITY flood: sent={FLOOD} validated={budget} dropped_before_decoding={FLOOD - budget} "
          f"events={len(reasons)}")


class _Services:
    """What the REST app reads: a registry and settings with a token (no broker needed)."""

    def __init__(self, registry, token: str):
        from types import SimpleNamespace

        self.registry = registry
        self.orchestrator = None
        self.settings = SimpleNamespace(api_token=token, open_reads_localhost=False)

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def readiness(self) -> dict[str, bool]:
        return {"database": self.registry.ping()}


def test_every_mutating_route_needs_the_token(tmp_path):
    from server_app.api.app import create_app
    from server_app.registry import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'api.db'}")
    reg.upgrade()
    app = create_app(_Services(reg, "s3cret-token-" + "z" * 20))
    mutating = [(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops
                if m.upper() in ("POST", "PUT", "PATCH", "DELETE")]  # fmt: skip
    assert mutating, "the API has no mutating route?"
    with TestClient(app) as client:
        for method, path in mutating:
            url = re.sub(r"\{[^}]+\}", "0", path)
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = client.request(method, url, headers=headers, json={})
                assert r.status_code in (401, 403), (method, url, headers, r.status_code)
    reg.dispose()
    print(f"\nRELIABILITY rest-auth: mutating_routes={len(mutating)} unauthenticated_attempts={2 * len(mutating)} refused=all")


@pytest.mark.postgres
def test_secrets_never_logged(broker, digits_files, tmp_path, inproc_server, pg_database_url, caplog):
    """Broker password and database password pass through the server's start, a round and stop;
    neither appears in any log record (DEBUG included)."""
    broker_pw = "brokerPW-" + "q7" * 12
    db_pw = "dbPW-" + "k9" * 12
    url = pg_database_url.replace("postgres@", f"postgres:{db_pw}@")  # trust auth ignores it; logs must too
    caplog.set_level(logging.DEBUG)
    fleet = SimFleet("127.0.0.1", broker.port, ["s0"]).start()
    try:
        services = inproc_server(server_options(url, tmp_path / "server", digits_files, broker.port, rounds=1,
                                                broker_username="koala-server", broker_password=broker_pw))  # fmt: skip
        wait_for(lambda: services.orchestrator.state == "finished", 120, "one round")
        services.stop()
    finally:
        fleet.stop()
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert len(caplog.records) > 20
    assert broker_pw not in text and db_pw not in text
    print(f"\nRELIABILITY secrets: log_records={len(caplog.records)} secrets_checked=2 leaks=0")
