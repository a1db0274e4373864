"""`/docs` and `/redoc` work offline: their HTML references only this server's URLs, and those
answer 200 (the vendored Swagger UI / ReDoc assets). Also the demo's API access settings."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from server_app.api.app import create_app


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_use_only_local_assets(page):
    c = TestClient(create_app())
    r = c.get(page)
    assert r.status_code == 200
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', r.text) + re.findall(r"url:\s*'([^']+)'", r.text)
    assert refs, r.text
    assert not re.search(r"https?://", r.text), "the page names a remote URL (CDN, fonts, validator)"
    for ref in refs:
        assert ref.startswith("/"), ref
        got = c.get(ref)
        assert got.status_code == 200 and len(got.content) > 100, ref
    if page == "/docs":
        assert "/static/docs/swagger-ui-bundle.js" in refs and "/openapi.json" in r.text


def test_demo_settings_give_a_token_and_open_local_reads():
    from server_app.api.auth import AuthConfig
    from server_app.demo.launcher import DemoApiSettings

    cfg = AuthConfig.from_settings(DemoApiSettings("tok-123"))
    assert cfg.token == "tok-123" and cfg.open_reads_localhost


def test_vendored_assets_fetch_nothing_remote():
    from server_app.api.docs import ASSETS

    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        text = (ASSETS / name).read_text(encoding="utf-8", errors="replace")
        assert "https://cdn." not in text and "fonts.googleapis" not in text, name


def test_openapi_declares_the_bearer_scheme():
    """Issue 29: /docs had no Authorize button. The OpenAPI document declares the HTTP bearer scheme
    and every guarded route (reads, mutations, predict) names it in its `security`."""
    doc = TestClient(create_app()).get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    ops = {(m.upper(), path): op for path, item in doc["paths"].items() for m, op in item.items()}
    for key in (("POST", "/api/v1/rounds/start"), ("POST", "/api/v1/rounds/stop"), ("GET", "/api/v1/rounds"),
                ("POST", "/api/v1/devices/{device_id}/revoke"), ("POST", "/api/v1/predict")):
        assert {"bearer": []} in ops[key].get("security", []), key
    assert "security" not in ops[("GET", "/healthz")]
