"""Round control through the REST API against the real orchestrator, over real HTTP, with real
rounds: private Mosquitto + ServerServices under uvicorn + 2 device agent processes (DemoRun).

Proves: schedule get/put (422 on bad input), start -> 202 + Location, a second start while one runs
-> 409, stop of a running round -> it ends `aborted`, stop with nothing running -> 409, and the
Prometheus gauges at /metrics move as rounds run.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.mosquitto
TOKEN = "live-api-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    from server_app.api.auth import AuthConfig
    from server_app.demo.launcher import DemoConfig, DemoRun
    from server_app.policy import KoalaPolicy
    from server_app.transport.broker import find_mosquitto_binary

    if find_mosquitto_binary() is None:
        pytest.skip("mosquitto binary not installed")
    cfg = DemoConfig(run_dir=str(tmp_path_factory.mktemp("api-live")), dataset="digits", devices=2,
                     proxy_size=200, train_size=600, test_size=300, policy=KoalaPolicy(rounds=1, deadline_s=90))  # fmt: skip
    demo = start_demo(DemoRun, cfg)
    try:
        demo.server.config.app.state.auth = AuthConfig(token=TOKEN, open_reads_localhost=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{demo.http_port}", timeout=30) as client:
            yield demo, client
    finally:
        demo.stop()


def start_demo(cls, cfg):  # noqa: ANN001, ANN201
    """DemoRun picks a free port and then binds it; another process can win that race once."""
    for attempt in (1, 2):
        demo = cls(cfg)
        try:
            return demo.start()
        except RuntimeError:
            demo.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def gauges(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("koala_")
    }


def wait_round(client: httpx.Client, rid: int, states: set[str], timeout_s: float = 150) -> dict:
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        r = client.get(f"/api/v1/rounds/{rid}", headers=AUTH)
        if r.status_code == 200 and r.json()["state"] in states:
            return r.json()
        time.sleep(0.25)
    raise AssertionError(f"round {rid} never reached {states}")


def test_round_control_and_metrics_over_live_rounds(live):
    demo, c = live
    before = gauges(c)  # scraped while the first automatic round is still being set up or run
    r0 = wait_round(c, 0, {"completed"})
    assert r0["counts"]["accepted"] == 2 and {s["status"] for s in r0["submissions"]} == {"accepted"}
    after = gauges(c)
    assert after[("koala_rounds", (("state", "completed"),))] == before.get(("koala_rounds", (("state", "completed"),)), 0) + 1
    assert after[("koala_devices_online", ())] == 2
    assert after[("koala_large_model_accuracy", ())] == pytest.approx(r0["metrics"]["large_test_acc"])
    assert after[("koala_model_metrics_round", ())] == 0
    accepted = ("koala_ingest_outcomes_total", (("outcome", "accepted"), ("reason", "")))
    assert after[accepted] == 2  # this server's Ingestor: both devices' results
    sub = ("koala_submissions_accepted_total", ())  # process-wide counter fed by ingestion's hook
    assert after[sub] - before.get(sub, 0) == 2 - before.get(accepted, 0)
    assert after[("koala_bytes_up_total", ())] > before.get(("koala_bytes_up_total", ()), 0)
    assert after[("koala_bytes_down_total", ())] > before.get(("koala_bytes_down_total", ()), 0)
    collect = ("koala_round_phase_seconds_count", (("phase", "collect"),))
    assert after[collect] == before.get(collect, 0) + 1
    hist = c.get("/api/v1/metrics/rounds", headers=AUTH).json()
    assert hist[0]["round_id"] == 0 and hist[0]["large_acc"] == pytest.approx(r0["metrics"]["large_test_acc"])
    assert hist[0]["bytes_up"] > 0 and hist[0]["bytes_down"] > 0 and hist[0]["small_acc"] is not None

    # schedule policy: read, change one field, validation errors
    pol = c.get("/api/v1/rounds/schedule", headers=AUTH).json()
    assert set(pol) == {"auto", "rounds", "min_devices", "interval_s"}
    assert c.put("/api/v1/rounds/schedule", json={"auto": False}).status_code == 401
    resp = c.put("/api/v1/rounds/schedule", headers=AUTH, json={"auto": False, "interval_s": 1.5})
    assert resp.status_code == 200, resp.text
    new = resp.json()
    assert new["auto"] is False and new["interval_s"] == 1.5 and new["rounds"] == pol["rounds"]
    assert c.put("/api/v1/rounds/schedule", headers=AUTH, json={"min_devices": 0}).status_code == 422
    assert c.put("/api/v1/rounds/schedule", headers=AUTH, json={"speed": "fast"}).status_code == 422
    assert c.post("/api/v1/rounds/start", headers=AUTH, json={"strategy": "x"}).status_code == 422

    # nothing running: stop is a conflict
    r = c.post("/api/v1/rounds/stop", headers=AUTH)
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")

    # start round 1 with dev001 frozen (SIGSTOP: still "online", never answers), so round 1 stays in
    # `collecting` until we act; refuse a second start; stop it -> aborted
    agent = demo.agents["dev001"]
    agent.send_signal(signal.SIGSTOP)
    try:
        _start_and_stop(c)
    finally:
        agent.send_signal(signal.SIGCONT)
    end = gauges(c)
    assert end[("koala_rounds", (("state", "aborted"),))] == 1 and end[("koala_current_round", ())] == 1


def _start_and_stop(c: httpx.Client) -> None:
    r = c.post("/api/v1/rounds/start", headers=AUTH, json={"reason": "live test"})
    assert r.status_code == 202, r.text
    assert r.json()["round_id"] == 1 and r.headers["location"].endswith("/api/v1/rounds/1")
    wait_round(c, 1, {"collecting"}, 60)
    r = c.post("/api/v1/rounds/start", headers=AUTH)
    assert r.status_code == 409 and "running" in r.json()["detail"]
    r = c.post("/api/v1/rounds/stop", headers=AUTH, json={"reason": "operator test"})
    assert r.status_code == 200 and r.json()["round_id"] == 1
    r1 = wait_round(c, 1, {"aborted", "failed", "completed"})
    assert r1["state"] == "aborted", r1
    assert {s["device_id"]: s["status"] for s in r1["submissions"]}.get("dev001") != "accepted"
    kinds = [e["kind"] for e in c.get("/api/v1/events", headers=AUTH).json()["items"]]
    assert "round_start_requested" in kinds and "round_stop_requested" in kinds
