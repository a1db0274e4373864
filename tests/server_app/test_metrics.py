"""Prometheus metrics: the event API, the scrape-time refresh from a real registry, and the Grafana
dashboard's queries against what /metrics really exports.

Counters are process-wide, so every assertion is on a delta between two scrapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from api_fixtures import RegistryServices, pg_database
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server_app import metrics
from server_app.api.app import create_app
from server_app.registry import Registry, crud

GRAFANA = Path(__file__).resolve().parents[2] / "dashboards" / "grafana" / "koala.json"


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def client(request: pytest.FixtureRequest, tmp_path: Path):
    gen = iter([f"sqlite:///{tmp_path / 'm.db'}"]) if request.param == "sqlite" else pg_database()
    reg = Registry(next(gen))
    reg.upgrade()
    with TestClient(create_app(RegistryServices(reg)), client=("127.0.0.1", 1)) as c:
        c.registry = reg  # type: ignore[attr-defined]
        yield c
    reg.dispose()
    next(gen, None)


def test_event_api_moves_the_counters(client):
    before = scrape(client)
    metrics.submission_accepted(1000)
    metrics.submission_accepted(24)
    metrics.submission_rejected("bad_digest", 10)
    metrics.submission_rejected("made-up reason!", 0)  # unknown reasons never create new labels
    metrics.observe_ingest(0.004)
    metrics.observe_phase("distill", 2.5)
    metrics.observe_phase("warp", 1.0)
    metrics.bytes_down(5000)
    metrics.round_finished("completed")
    metrics.submission_accepted(float("nan"))  # odd input is ignored, never raises
    after = scrape(client)
    d = lambda name, **lb: val(after, name, **lb) - val(before, name, **lb)  # noqa: E731
    assert d("koala_submissions_accepted_total") == 3
    assert d("koala_bytes_up_total") == 1034
    assert d("koala_submissions_rejected_total", reason="bad_digest") == 1
    assert d("koala_submissions_rejected_total", reason="other") == 1
    assert not any("made" in dict(k[1]).get("reason", "") for k in after)
    assert d("koala_ingest_latency_seconds_count") == 1
    assert d("koala_ingest_latency_seconds_bucket", le="0.005") == 1
    assert d("koala_round_phase_seconds_count", phase="distill") == 1
    assert d("koala_round_phase_seconds_count", phase="other") == 1
    assert d("koala_bytes_down_total") == 5000
    assert d("koala_rounds_finished_total", state="completed") == 1


def test_gauges_follow_the_registry_at_scrape_time(client):
    reg: Registry = client.registry
    s0 = scrape(client)
    assert val(s0, "koala_devices_online") == 0 and val(s0, "koala_rounds", state="collecting") == 0
    with reg.session() as s:
        crud.upsert_device_status(s, "d1", status="online", arch="cnn_small")
        crud.upsert_device_status(s, "d2", status="online", arch="cnn_small")
        crud.upsert_device_status(s, "d3", status="offline", arch="cnn_small")
        crud.create_round(s, strategy="koala_homo", round_id=0)
        crud.transition_round(s, 0, "collecting")
    s1 = scrape(client)
    assert val(s1, "koala_devices_online") == 2 and val(s1, "koala_devices", status="offline") == 1
    assert val(s1, "koala_rounds", state="collecting") == 1 and val(s1, "koala_current_round") == 0
    with reg.session() as s:
        crud.upsert_device_status(s, "d2", status="offline")
        crud.transition_round(s, 0, "aggregating")
        crud.transition_round(s, 0, "completed", metrics={"large_test_acc": 0.8125, "rkd_loss": 0.25, "small_test_acc_mean": 0.5})
        crud.create_round(s, strategy="koala_homo", round_id=1)
    s2 = scrape(client)
    assert val(s2, "koala_devices_online") == 1
    assert val(s2, "koala_rounds", state="completed") == 1 and val(s2, "koala_rounds", state="collecting") == 0
    assert val(s2, "koala_rounds", state="created") == 1 and val(s2, "koala_current_round") == 1
    assert val(s2, "koala_large_model_accuracy") == pytest.approx(0.8125)
    assert val(s2, "koala_kd_loss") == pytest.approx(0.25)
    assert val(s2, "koala_small_model_accuracy") == pytest.approx(0.5)
    assert val(s2, "koala_model_metrics_round") == 0


def test_every_documented_metric_is_exported(client):
    names = {k[0] for k in scrape(client)}
    assert names >= metrics.METRIC_NAMES, sorted(metrics.METRIC_NAMES - names)


def _grafana_exprs() -> list[str]:
    dash = json.loads(GRAFANA.read_text())
    exprs = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            exprs.append(t["expr"])
    return exprs


def _ingesting_app(reg: Registry, tmp_path: Path) -> tuple[RegistryServices, object]:
    """The API around a registry plus a real Ingestor: what ServerServices exposes to /metrics."""
    from server_app.ingest import Ingestor, Presence
    from server_app.rounds.orchestrator import RegistryStore

    services = RegistryServices(reg)
    services.ingestor = Ingestor(RegistryStore(reg, tmp_path), Presence(), lambda: None)  # type: ignore[attr-defined]
    return services, create_app(services)


def test_grafana_dashboard_queries_only_exported_metrics(tmp_path):
    dash = json.loads(GRAFANA.read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    reg = Registry(f"sqlite:///{tmp_path / 'g.db'}")
    reg.upgrade()
    with TestClient(_ingesting_app(reg, tmp_path)[1]) as c:
        exported = {k[0] for k in scrape(c)}
    reg.dispose()
    used = set()
    for e in _grafana_exprs():
        used |= set(re.findall(r"\bkoala_[a-z0-9_]+", e))
    assert used, "the dashboard queries no koala_ metric"
    missing = used - exported
    assert not missing, f"dashboard queries metrics /metrics does not export: {sorted(missing)}"
    # every metric family of the module is on the dashboard somewhere
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in metrics.METRIC_NAMES | metrics.INGEST_METRIC_NAMES}
    on_dash = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families <= on_dash, sorted(families - on_dash)


def test_ingestion_outcomes_are_exported_from_the_real_ingestor(tmp_path):
    """A real Ingestor (registry-backed store) refuses results while no round collects; /metrics
    shows its outcome counts per reason, and only for the app whose services own that Ingestor."""
    import numpy as np

    from device_firmware_py.contract import codec, topics
    from device_firmware_py.contract import messages as cm
    reg = Registry(f"sqlite:///{tmp_path / 'i.db'}")
    reg.upgrade()
    services, app = _ingesting_app(reg, tmp_path)
    res = cm.Result(round_id=0, device_id="d1", arch="cnn_small", num_samples=10,
                    proxy_logits=np.zeros((4, 10), np.float32))  # fmt: skip
    with TestClient(app, client=("127.0.0.1", 1)) as c, TestClient(create_app(RegistryServices(reg))) as other:
        s0 = scrape(c)
        assert val(s0, "koala_ingest_outcomes_total", outcome="accepted", reason="") == 0
        out1 = services.ingestor.ingest_batch([(topics.device_result("d1"), codec.encode(res))])[0]
        out2 = services.ingestor.ingest_batch([(topics.device_result("d2"), codec.encode(res))])[0]  # spoofed
        s1 = scrape(c)
        assert out2.reason == "spoofed_device"
        assert val(s1, "koala_ingest_outcomes_total", outcome="rejected", reason="spoofed_device") == 1
        assert val(s1, "koala_ingest_outcomes_total", outcome=out1.status, reason=out1.reason or "") == 1
        assert not any(k[0] == "koala_ingest_outcomes_total" for k in scrape(other))
    reg.dispose()
