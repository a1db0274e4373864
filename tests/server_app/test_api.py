"""REST API v1 against a real registry: SQLite file and a fresh PostgreSQL database.

Every endpoint is exercised through HTTP (Starlette's TestClient drives the real ASGI app), with
the happy path and its 401/403/404/422 answers. Start/stop/schedule against the real orchestrator
are in test_api_live.py (they need a broker and device agents).
"""

from __future__ import annotations

import hashlib
import json

import pytest
from api_fixtures import TOKEN, RegistryServices, pg_database, seed
from fastapi.testclient import TestClient

from server_app.api.app import create_app
from server_app.api.auth import AuthConfig
from server_app.registry import Registry

LOCAL = ("127.0.0.1", 40001)
REMOTE = ("192.0.2.7", 40002)  # TEST-NET-1: never loopback
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp(f"api-{request.param}")
    gen = iter([f"sqlite:///{d / 'koala.db'}"]) if request.param == "sqlite" else pg_database()
    url = next(gen)
    reg = Registry(url)
    reg.upgrade()
    info = seed(reg, d)
    yield reg, info
    reg.dispose()
    next(gen, None)


def make_app(reg: Registry, *, token: str | None = TOKEN, open_local: bool = True):
    app = create_app(RegistryServices(reg))
    app.state.auth = AuthConfig(token=token, open_reads_localhost=open_local)
    return app


@pytest.fixture(scope="module")
def local(seeded):
    with TestClient(make_app(seeded[0]), client=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def remote(seeded):
    with TestClient(make_app(seeded[0]), client=REMOTE) as c:
        yield c


def assert_problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"].endswith(str(status))
    return body


# ---- OpenAPI -------------------------------------------------------------------------------------
def test_openapi_documents_every_operation(local):
    spec = local.get("/openapi.json").json()
    ops = [(p, m, o) for p, item in spec["paths"].items() for m, o in item.items()]
    api = [(p, m, o) for p, m, o in ops if p.startswith("/api/v1/")]
    assert len(api) >= 17
    for p, m, o in api:
        assert o.get("summary"), f"{m.upper()} {p} has no summary"
        assert "401" in o["responses"], f"{m.upper()} {p} does not document 401"
    assert local.get("/docs").status_code == 200
    start = spec["paths"]["/api/v1/rounds/start"]["post"]
    assert "409" in start["responses"] and "202" in start["responses"]


# ---- auth ------------------------------------------------------------------------------------------
def test_reads_open_on_localhost_only_when_configured(seeded, local, remote):
    assert local.get("/api/v1/devices").status_code == 200
    r = remote.get("/api/v1/devices")
    body = assert_problem(r, 401)
    assert "missing bearer token" in body["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_problem(remote.get("/api/v1/devices", headers={"Authorization": "Bearer nope"}), 401)
    assert_problem(remote.get("/api/v1/devices", headers={"Authorization": f"Basic {TOKEN}"}), 401)
    assert remote.get("/api/v1/devices", headers=AUTH).status_code == 200
    with TestClient(make_app(seeded[0], open_local=False), client=LOCAL) as strict:
        assert_problem(strict.get("/api/v1/rounds"), 401)
        assert strict.get("/api/v1/rounds", headers=AUTH).status_code == 200


def test_server_without_token_refuses_mutations_and_remote_reads(seeded):
    app = make_app(seeded[0], token=None)
    with TestClient(app, client=LOCAL) as c:
        body = assert_problem(c.post("/api/v1/devices/dev-a/revoke", headers=AUTH), 403)
        assert "no API token configured" in body["detail"]
        assert_problem(c.post("/api/v1/rounds/start", headers=AUTH), 403)
        assert c.get("/api/v1/devices").status_code == 200  # localhost reads still open
    with TestClient(app, client=REMOTE) as c:
        assert_problem(c.get("/api/v1/devices", headers=AUTH), 403)


def test_mutations_need_the_token_even_from_localhost(local):
    assert_problem(local.post("/api/v1/devices/dev-a/revoke"), 401)
    assert_problem(local.post("/api/v1/rounds/stop", headers={"Authorization": "Bearer wrong"}), 401)
    assert_problem(local.put("/api/v1/rounds/schedule", json={"auto": False}), 401)


# ---- devices ---------------------------------------------------------------------------------------
def test_list_devices_filters_and_pages(local):
    page = local.get("/api/v1/devices").json()
    assert [d["id"] for d in page["items"]][:3] == ["dev-a", "dev-b", "dev-c"]
    assert page["next_offset"] is None
    online = local.get("/api/v1/devices", params={"status": "online"}).json()["items"]
    assert {d["id"] for d in online} == {"dev-a", "dev-c"} and all(d["online"] for d in online)
    assert [d["id"] for d in local.get("/api/v1/devices", params={"arch": "mlp_tiny"}).json()["items"]] == ["dev-b"]
    p1 = local.get("/api/v1/devices", params={"limit": 2}).json()
    assert len(p1["items"]) == 2 and p1["next_offset"] == 2
    p2 = local.get("/api/v1/devices", params={"limit": 2, "offset": p1["next_offset"]}).json()
    assert [d["id"] for d in p2["items"]] == ["dev-c"] and p2["next_offset"] is None


def test_list_devices_rejects_bad_query(local):
    body = assert_problem(local.get("/api/v1/devices", params={"limit": 0}), 422)
    assert body["errors"][0]["loc"] == ["query", "limit"]
    assert_problem(local.get("/api/v1/devices", params={"status": "sleepy"}), 422)
    assert_problem(local.get("/api/v1/devices", params={"limit": 5000}), 422)


def test_device_detail(local):
    d = local.get("/api/v1/devices/dev-b").json()
    assert d["arch"] == "mlp_tiny" and d["status"] == "offline" and d["online"] is False and d["last_seen"]
    assert [(s["round_id"], s["status"], s["reason"]) for s in d["submissions"]] == [(0, "rejected", "bad_digest")]
    a = local.get("/api/v1/devices/dev-a").json()
    assert a["label_histogram"] == [30] * 10
    assert [(s["round_id"], s["status"]) for s in a["submissions"]] == [(1, "assigned"), (0, "accepted")]
    assert a["submissions"][1]["bytes_up"] == 2500


def test_device_detail_404_and_422(local):
    body = assert_problem(local.get("/api/v1/devices/ghost"), 404)
    assert "ghost" in body["detail"] and body["instance"] == "/api/v1/devices/ghost"
    assert_problem(local.get("/api/v1/devices/bad$id"), 422)


def test_revoke_and_readmit(seeded, remote):
    assert_problem(remote.post("/api/v1/devices/ghost/revoke", headers=AUTH), 404)
    assert_problem(remote.post("/api/v1/devices/dev-c/revoke", headers=AUTH, json={"revoked": "maybe"}), 422)
    assert_problem(remote.post("/api/v1/devices/dev-c/revoke", headers=AUTH, json={"oops": 1}), 422)
    r = remote.post("/api/v1/devices/dev-c/revoke", headers=AUTH)
    assert r.status_code == 200 and r.json()["revoked"] is True
    ids = [d["id"] for d in remote.get("/api/v1/devices", headers=AUTH).json()["items"]]
    assert "dev-c" not in ids
    listed = remote.get("/api/v1/devices", headers=AUTH, params={"include_revoked": True}).json()["items"]
    assert "dev-c" in [d["id"] for d in listed]
    ev = remote.get("/api/v1/events", headers=AUTH, params={"kind": "device_revoked"}).json()["items"]
    assert ev[0]["device_id"] == "dev-c"
    r = remote.post("/api/v1/devices/dev-c/revoke", headers=AUTH, json={"revoked": False})
    assert r.json()["revoked"] is False


# ---- rounds ----------------------------------------------------------------------------------------
def test_list_rounds_with_counts(local):
    items = local.get("/api/v1/rounds").json()["items"]
    assert [r["id"] for r in items] == [1, 0]
    r0 = items[1]
    assert r0["state"] == "completed" and r0["metrics"]["large_test_acc"] == pytest.approx(0.71)
    assert r0["counts"]["accepted"] == 1 and r0["counts"]["rejected"] == 1 and r0["counts"]["received"] == 2
    assert [r["id"] for r in local.get("/api/v1/rounds", params={"state": "collecting"}).json()["items"]] == [1]
    assert_problem(local.get("/api/v1/rounds", params={"state": "sleeping"}), 422)


def test_round_detail_has_submissions_and_rejection_reasons(local):
    r = local.get("/api/v1/rounds/0").json()
    subs = {s["device_id"]: s for s in r["submissions"]}
    assert subs["dev-a"]["status"] == "accepted" and subs["dev-a"]["bytes_up"] == 2500
    assert subs["dev-b"]["status"] == "rejected" and subs["dev-b"]["reason"] == "bad_digest"
    assert [e["detail"]["reason"] for e in r["rejections"]] == ["bad_digest"]
    assert r["started"] and r["finished"] and r["participants"] == ["dev-a", "dev-b"]


def test_current_round_and_404s(local):
    cur = local.get("/api/v1/rounds/current").json()
    assert cur["id"] == 1 and cur["state"] == "collecting" and cur["deadline"]
    assert_problem(local.get("/api/v1/rounds/99"), 404)
    assert_problem(local.get("/api/v1/rounds/-1"), 422)
    assert_problem(local.get("/api/v1/rounds/abc"), 422)


def test_round_control_without_orchestrator_is_503(remote):
    for method, path in (("post", "/api/v1/rounds/start"), ("post", "/api/v1/rounds/stop"), ("get", "/api/v1/rounds/schedule")):
        body = assert_problem(getattr(remote, method)(path, headers=AUTH), 503)
        assert "orchestrator" in body["detail"]
    assert_problem(remote.put("/api/v1/rounds/schedule", headers=AUTH, json={"auto": False}), 503)


# ---- models ----------------------------------------------------------------------------------------
def test_models_list_and_download_with_sha256(seeded, local):
    info = seeded[1]
    items = local.get("/api/v1/models", params={"kind": "large"}).json()["items"]
    v1 = next(m for m in items if m["version"] == 1)
    assert v1["sha256"] == info["model_sha256"] and "path" not in v1
    r = local.get(v1["download"], params={"format": "checkpoint"})  # the stored file itself
    assert r.status_code == 200 and r.content == info["model_bytes"]
    assert r.headers["x-content-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert r.headers["digest"].startswith("sha-256=")
    # the default is the portable export (test_model_export.py), which this seeded file has none of
    assert "no portable export" in assert_problem(local.get(v1["download"]), 404)["detail"]
    assert_problem(local.get(v1["download"], params={"format": "pickle"}), 422)
    assert_problem(local.get("/api/v1/models/large/vgg_large/7/download"), 404)
    body = assert_problem(local.get("/api/v1/models/large/vgg_large/2/download", params={"format": "checkpoint"}), 404)
    assert "file is missing" in body["detail"]
    assert_problem(local.get("/api/v1/models/huge/vgg_large/1/download"), 422)
    assert_problem(local.get("/api/v1/models", params={"kind": "medium"}), 422)


def test_small_model_artifacts(local):
    arts = local.get("/api/v1/models/artifacts").json()
    tfl = next(a for a in arts if a["name"] == "cnn_small_28x28x1.tflite")
    r = local.get(tfl["download"])
    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == tfl["sha256"] == r.headers["x-content-sha256"]
    assert_problem(local.get("/api/v1/models/artifacts/nope.tflite"), 404)
    assert_problem(local.get("/api/v1/models/artifacts/..%2Fmanifest.py"), 404)


# ---- metrics history / events ----------------------------------------------------------------------
def test_metrics_history_per_round(local):
    rows = local.get("/api/v1/metrics/rounds").json()
    assert [r["round_id"] for r in rows] == [0, 1]
    r0 = rows[0]
    assert r0["large_acc"] == pytest.approx(0.71) and r0["kd_loss"] == pytest.approx(0.42)
    assert r0["small_acc"] == pytest.approx(0.6)  # from dev-a's accepted submission
    assert r0["bytes_up"] == 2500 + 700 and r0["bytes_down"] == 8000
    assert r0["accepted"] == 1 and r0["rejected"] == 1
    assert rows[1]["large_acc"] is None
    assert [r["round_id"] for r in local.get("/api/v1/metrics/rounds", params={"last": 1}).json()] == [1]
    assert_problem(local.get("/api/v1/metrics/rounds", params={"last": 0}), 422)


def test_events_filter_and_page(local):
    rej = local.get("/api/v1/events", params={"kind": "rejected"}).json()["items"]
    assert [(e["device_id"], e["detail"]["reason"]) for e in rej] == [("dev-c", "spoofed_device"), ("dev-b", "bad_digest")]
    assert [e["round_id"] for e in local.get("/api/v1/events", params={"round_id": 0, "kind": "rejected"}).json()["items"]] == [0]
    p1 = local.get("/api/v1/events", params={"limit": 1}).json()
    assert len(p1["items"]) == 1 and p1["next_offset"] == 1
    assert_problem(local.get("/api/v1/events", params={"level": "loud"}), 422)


# ---- live ------------------------------------------------------------------------------------------
def test_live_snapshot(local):
    snap = local.get("/api/v1/live/snapshot").json()
    assert snap["current_round"]["id"] == 1 and snap["online"] >= 1
    assert {d["id"] for d in snap["devices"]} >= {"dev-a", "dev-b"}


def test_live_stream_sends_snapshot_then_ends(local, remote):
    with local.stream("GET", "/api/v1/live/stream", params={"poll_s": 0.2, "max_s": 1}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert text.startswith("retry: ")
    block = next(b for b in text.split("\n\n") if "event: snapshot" in b)
    snap = json.loads("".join(line[6:] for line in block.splitlines() if line.startswith("data: ")))
    assert snap["current_round"]["state"] == "collecting"
    assert_problem(remote.get("/api/v1/live/stream"), 401)


# ---- dashboard and problems for unknown paths --------------------------------------------------------
def test_dashboard_is_served(local):
    r = local.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/dashboard/"
    page = local.get("/dashboard/")
    assert page.status_code == 200 and 'id="fleet"' in page.text and "app.js" in page.text
    assert "https://" not in page.text.split("<footer")[0]  # no CDN: works offline
    js = local.get("/dashboard/app.js")
    assert js.status_code == 200 and "/live/stream" in js.text
    assert_problem(local.get("/api/v1/nothing-here"), 404)


def test_auth_reads_the_server_settings(seeded):
    """With no explicit AuthConfig the app takes token and localhost switch from ServerServices.settings."""
    from server_app.config import load_settings

    settings = load_settings(api={"bearer_token": TOKEN, "open_reads_localhost": False})
    app = create_app(RegistryServices(seeded[0], settings=settings))
    with TestClient(app, client=LOCAL) as c:
        assert_problem(c.get("/api/v1/events"), 401)
        assert c.get("/api/v1/events", headers=AUTH).status_code == 200
        assert_problem(c.post("/api/v1/devices/dev-a/revoke", headers={"Authorization": "Bearer " + TOKEN[:-1]}), 401)
