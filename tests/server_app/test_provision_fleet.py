"""`koala provision fleet MANIFEST`: one command registers every device, writes the broker files and
one bundle per device; a second run changes nothing; a bad manifest is one line and exit 2.

Fast: the manifest names a prepared wheelhouse (a lock file and a stand-in wheel), so no `pip
download` runs; the bundles' wheels are tested for real in test_provision_bundle.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from server_app.cli import main as koala
from server_app.provisioning.passwords import verify

DEVICES = (("pi-01", "cnn_small", "/var/lib/koala/data.npz"), ("pi-02", "cnn_small", "/srv/pi-02.npz"),
           ("jet-01", "mlp_tiny", "/data/jet.npz"))


def _manifest(tmp_path: Path, db: str, devices=DEVICES, extra: str = "") -> Path:
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    (wheels / "requirements.lock").write_text("numpy==2.0.0\n")
    (wheels / "koala_edge_device-0.1.0-py3-none-any.whl").write_bytes(b"stand-in")
    lines = [
        "name: test-fleet",
        f"database: {{url: '{db}'}}",
        "broker: {url: 'mqtts://127.0.0.1:8883', dir: broker, tls_hosts: [broker.test]}",
        "bundles: {out: bundles, wheelhouse: wheels}",
        "devices:",
        *(f"  - {{id: '{i}', arch: {a}, data: {p}}}" for i, a, p in devices),
    ]
    path = tmp_path / "fleet.yml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _hashes(db: str) -> dict[str, str]:
    with create_engine(db).connect() as conn:
        return dict(conn.execute(text("select id, credentials_hash from devices")).all())


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_one_command_provisions_the_fleet_and_is_idempotent(tmp_path, capsys) -> None:
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    manifest, work = _manifest(tmp_path, db), tmp_path / "work"
    assert koala(["provision", "fleet", str(manifest), "--out", str(work)]) == 0
    out = capsys.readouterr().out

    hashes = _hashes(db)
    assert set(hashes) == {d[0] for d in DEVICES} and all(h.startswith("$7$") for h in hashes.values())
    broker = work / "broker"
    for f in ("mosquitto.conf", "dynamic-security.json", "passwd", "acl", "certs/ca.crt", "certs/server.crt"):
        assert (broker / f).is_file(), f
    assert "broker.test" in (broker / "certs/server.hosts").read_text()
    passwd = (broker / "passwd").read_text()
    bundles = work / "bundles"
    assert sorted(p.name for p in bundles.glob("*.tar.gz")) == sorted(f"koala-bundle-{d[0]}.tar.gz" for d in DEVICES)
    for dev, arch, data in DEVICES:
        etc = bundles / f"koala-bundle-{dev}" / "etc/koala"
        cfg = json.loads((etc / "device.json").read_text())
        assert (cfg["arch"], cfg["data_path"], cfg["broker_url"]) == (arch, data, "mqtts://127.0.0.1:8883")
        secret = (etc / "device.secret").read_text().strip()
        assert verify(secret, hashes[dev]) and f"{dev}:{hashes[dev]}" in passwd  # bundle secret = registry = broker
        assert (etc / "ca.crt").read_bytes() == (broker / "certs/ca.crt").read_bytes()
        assert re.search(rf"^{dev}\s+{arch}\s+\S*koala-bundle-{dev}\.tar\.gz$", out, re.M), out

    # the server's settings for this fleet: loadable, pointing at the files just written, no secret inside
    from server_app.config import load_settings

    settings = load_settings(work / "server.toml")
    assert settings.database.url == db and settings.broker.username == "koala-server"
    assert settings.broker.password.get_secret_value() == (broker / "secrets/koala-server.password").read_text().strip()
    assert settings.api.bearer_token.get_secret_value() == (work / "api.token").read_text().strip()
    assert settings.broker.provision_dir == (broker).resolve() and settings.paths.data_dir == (work / "data").resolve()
    text_ = (work / "server.toml").read_text()
    assert settings.broker.password.get_secret_value() not in text_ and settings.api.bearer_token.get_secret_value() not in text_

    before = _snapshot(work)
    assert koala(["provision", "fleet", str(manifest), "--out", str(work)]) == 0
    out2 = capsys.readouterr().out
    assert _hashes(db) == hashes and _snapshot(work) == before  # no secret rotated, no file rewritten
    assert "0 bundled" in out2 and "(unchanged)" in out2

    # A device added to the manifest later: only it gets a bundle; the others keep their secrets.
    more = (*DEVICES, ("pi-03", "cnn_small", "/var/lib/koala/data.npz"))
    assert koala(["provision", "fleet", str(_manifest(tmp_path, db, more)), "--out", str(work)]) == 0
    assert "1 bundled" in capsys.readouterr().out
    new = _hashes(db)
    assert {k: new[k] for k in hashes} == hashes and "pi-03:" in (broker / "passwd").read_text()

    # --rotate: every device gets a new secret and bundle, and the broker files follow.
    assert koala(["provision", "fleet", str(_manifest(tmp_path, db, more)), "--out", str(work), "--rotate"]) == 0
    rotated = _hashes(db)
    assert all(rotated[k] != new[k] for k in new)
    assert all(f"{k}:{h}" in (broker / "passwd").read_text() for k, h in rotated.items())


@pytest.mark.parametrize(
    ("devices", "extra", "needle"),
    [
        (DEVICES, "colour: blue\n", "colour: unknown key"),
        ((("a/b", "cnn_small", "/d.npz"),), "", "devices.0.id"),
        ((("koala-server", "cnn_small", "/d.npz"),), "", "reserved"),
        ((("pi-1", "resnet_huge", "/d.npz"),), "", "unknown architecture"),
        ((("pi-1", "cnn_small", "/d.npz"), ("pi-1", "mlp_tiny", "/e.npz")), "", "listed twice"),
    ],
)
def test_bad_manifest_is_one_line_and_exit_2(tmp_path, capsys, devices, extra, needle) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    rc = koala(["provision", "fleet", str(_manifest(tmp_path, db, devices, extra)), "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("koala provision fleet: ") and needle in err, err
    assert not (tmp_path / "w").exists()  # nothing written


def test_missing_or_unparsable_manifest_is_one_line(tmp_path, capsys) -> None:
    assert koala(["provision", "fleet", str(tmp_path / "nope.yml")]) == 2
    bad = tmp_path / "bad.yml"
    bad.write_text("devices: [\n")
    assert koala(["provision", "fleet", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "No such file" in err[0] and "not valid YAML" in err[1]
