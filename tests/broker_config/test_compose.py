"""docker-compose.yml is valid Compose and wires what the stack needs (no Docker engine here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose_cmd() -> list[str] | None:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates() -> None:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    out = subprocess.run(
        [*cmd, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_compose_wires_the_stack() -> None:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = spec["services"]
    assert set(svc) >= {"mosquitto", "postgres", "server", "prometheus", "grafana"}
    workers = {k: v for k, v in svc.items() if k.startswith("ingest-")}
    assert sorted(workers) == ["ingest-1", "ingest-2"]  # profile `scale`: the server split (docs/scale-out.md)
    for name, w in workers.items():
        assert w["profiles"] == ["scale"]
        assert f"--role ingest --worker-id {name}" in w["command"][-1]
        assert "koala-data:/var/lib/koala" in w["volumes"] and "koala-data:/var/lib/koala" in svc["server"]["volumes"]
    assert svc["mosquitto"]["command"][-1] == "/mosquitto/config/mosquitto.conf"
    assert svc["mosquitto"]["ports"] == ["8883:8883"]  # TLS only; no plain 1883 exposed
    assert svc["server"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / "deploy" / "Dockerfile").is_file()
    assert "exec koala serve" in svc["server"]["command"][-1]
    assert svc["server"]["environment"]["KOALA_BROKER__URL"] == "mqtts://mosquitto:8883"
    assert "PASSWORD" not in " ".join(svc["server"]["environment"])  # secret comes from the mounted file
    grafana_mounts = " ".join(svc["grafana"]["volumes"])
    assert "./dashboards/grafana:" in grafana_mounts and "./deploy/grafana/provisioning:" in grafana_mounts
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    job = prom["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["server:8000"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/koala.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/koala"


def test_docker_profile_renders_container_paths(tmp_path) -> None:
    from server_app.cli import main as koala

    out = tmp_path / "broker"
    assert (
        koala(
            [
                "provision",
                "--db",
                f"sqlite:///{tmp_path / 'r.db'}",
                "broker-files",
                "--out",
                str(out),
                "--profile",
                "docker",
            ]
        )
        == 0
    )
    conf = (out / "mosquitto.conf").read_text()
    assert (
        "plugin_opt_config_file /mosquitto/config/dynamic-security.json" in conf
        and "plugin /usr/lib/mosquitto_dynamic_security.so" in conf
        and "persistence_location /mosquitto/data/" in conf
    )
    assert "\npassword_file" not in conf and "\nacl_file" not in conf
    assert "keyfile /mosquitto/config/certs/server.key" in conf and "\nlistener 1883" not in conf
    assert (out / "certs" / "server.hosts").read_text().split() == ["mosquitto"]
