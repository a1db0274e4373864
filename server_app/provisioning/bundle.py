"""Assemble one device's flashable bundle: a directory laid out like the device's root filesystem
plus a tarball of it.

    koala-bundle-<id>/
      flash.sh                       installs over SSH (--host) or into a mounted root (--target-root)
      manifest.json                  sha256 of every file (what was flashed, for audits)
      etc/koala/device.json          DeviceConfig (no secret in it)
      etc/koala/device.secret        the broker password, 0600
      etc/koala/ca.crt               the private CA the broker's certificate chains to
      etc/koala/client.{crt,key}     optional TLS client certificate
      etc/systemd/system/koala-device.service
      opt/koala/install-venv.sh      offline venv creation (flash.sh --install-venv, or first boot)
      opt/koala/wheels/*.whl         the device-only agent wheel (with the small-model artifacts)
                                     + its dependencies, slimmed, + requirements.lock
      opt/koala/proxy/proxy.npz      proxy inputs (or only their sha256 + URL in device.json)
      var/lib/koala/data.npz         optional private data (demos and tests)

The bundle is relocatable: device.json and the unit hold `@ROOT@` where the device's root goes,
and `flash.sh` fills it in at install time: empty for a device's own root (`--host`, or
`--target-root /mnt/sdcard`), the target directory itself with `--in-place` (a staging root, a
container, a test, where the agent runs from that directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from server_app.provisioning.identity import check_device_id
from server_app.provisioning.passwords import write_secret_file
from server_app.provisioning.tls import CertPair, write_pair
from server_app.provisioning.wheels import Target, build_device_wheelhouse

TEMPLATES = Path(__file__).with_name("templates")
ARTIFACTS = Path(__file__).resolve().parents[2] / "device_firmware_py" / "artifacts"


@dataclass
class BundleSpec:
    device_id: str
    arch: str
    secret: str
    broker_url: str  # mqtts://broker.example:8883
    ca_cert_pem: bytes
    data: Path | None = None  # ship private data (demo); else the device has its own
    data_path: str = ""  # where the device reads its private data; default @ROOT@/var/lib/koala/data.npz
    proxy: Path | None = None  # ship the proxy npz ...
    proxy_sha256: str = ""  # ... or only its digest
    proxy_url: str = ""  # ... and where to fetch it
    client_cert: CertPair | None = None
    wheelhouse: Path | None = None  # reuse already-built wheels (koala_edge + deps + lock)
    target: Target = field(default_factory=Target)
    artifacts_dir: Path = ARTIFACTS


ROOT_MARK = "@ROOT@"  # flash.sh replaces it with the device's root ("" or the --in-place target)


def _device_path(rel: str) -> str:
    return f"{ROOT_MARK}/{rel}"


def _render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, val in values.items():
        text = text.replace(f"@{key}@", val)
    if "@DEVICE_ID@" in text:
        raise ValueError(f"unrendered placeholder left in {template}")
    return text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_arch(spec: BundleSpec) -> None:
    """The agent wheel carries every artifact; refuse an arch that has none before building."""
    if not any(spec.artifacts_dir.glob(f"{spec.arch}_*.tflite")):
        raise FileNotFoundError(f"no small-model artifact {spec.arch}_*.tflite in {spec.artifacts_dir}")


def _wheels(spec: BundleSpec, dest: Path) -> None:
    if spec.wheelhouse and (spec.wheelhouse / "requirements.lock").exists():
        if not any(spec.wheelhouse.glob("koala_edge_device-*.whl")):
            raise ValueError(f"wheelhouse {spec.wheelhouse} has no koala_edge_device wheel (made by an older "
                             "koala provision?); leave bundles.wheelhouse unset to build a fresh one")  # fmt: skip
        shutil.copytree(spec.wheelhouse, dest, dirs_exist_ok=True)
        return
    build_device_wheelhouse(dest, spec.target)


def device_config(spec: BundleSpec) -> dict:
    """The DeviceConfig JSON (device_firmware_py.config); `@ROOT@` marks where flash.sh puts the root."""
    cfg = {
        "device_id": spec.device_id,
        "arch": spec.arch,
        "broker_url": spec.broker_url,
        "username": spec.device_id,
        "password_file": _device_path("etc/koala/device.secret"),
        "ca_file": _device_path("etc/koala/ca.crt"),
        "data_path": spec.data_path or _device_path("var/lib/koala/data.npz"),
        "proxy_path": _device_path("opt/koala/proxy/proxy.npz"),
        "proxy_sha256": spec.proxy_sha256,
        "state_dir": _device_path("var/lib/koala/state"),
        # a field device is Pi-class: one LiteRT training interpreter at a time, and the training
        # interpreter released while the int8 quantizer child runs (same weights; README "Devices
        # in the field": mobilenet_tiny +133 -> +79 MiB over numpy, rounds no slower)
        "low_memory": True,
        "release_before_quantize": True,
        "extra": {"proxy_url": spec.proxy_url} if spec.proxy_url else {},
    }
    return cfg


def build_bundle(spec: BundleSpec, out: Path) -> Path:
    """Write the bundle directory `out/koala-bundle-<id>` and its .tar.gz; return the tarball."""
    check_device_id(spec.device_id)
    _check_arch(spec)
    root = out / f"koala-bundle-{spec.device_id}"
    if root.exists():
        shutil.rmtree(root)
    etc, opt = root / "etc" / "koala", root / "opt" / "koala"
    for d in (etc, opt / "proxy", root / "etc" / "systemd" / "system"):
        d.mkdir(parents=True, exist_ok=True)

    if spec.proxy is not None:
        shutil.copy2(spec.proxy, opt / "proxy" / "proxy.npz")
        spec.proxy_sha256 = _sha256(spec.proxy)
    if spec.data is not None:
        (root / "var" / "lib" / "koala").mkdir(parents=True, exist_ok=True)
        shutil.copy2(spec.data, root / "var" / "lib" / "koala" / "data.npz")
    _wheels(spec, opt / "wheels")

    (etc / "device.json").write_text(json.dumps(device_config(spec), indent=2) + "\n")
    write_secret_file(etc / "device.secret", spec.secret)
    (etc / "ca.crt").write_bytes(spec.ca_cert_pem)
    if spec.client_cert is not None:
        write_pair(spec.client_cert, etc / "client.crt", etc / "client.key")
    values = {"DEVICE_ID": spec.device_id}
    unit = root / "etc" / "systemd" / "system" / "koala-device.service"
    unit.write_text(_render("koala-device.service", values))
    for name, dest in (("flash.sh", root / "flash.sh"), ("install-venv.sh", opt / "install-venv.sh")):
        dest.write_text(_render(name, values))
        dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    (opt / "BUNDLE_ID").write_text(uuid.uuid4().hex + "\n")

    files = sorted(p for p in root.rglob("*") if p.is_file())
    manifest = {
        "device_id": spec.device_id,
        "arch": spec.arch,
        "broker_url": spec.broker_url,
        "files": {str(p.relative_to(root)): _sha256(p) for p in files if p.name != "device.secret"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    tarball = out / f"koala-bundle-{spec.device_id}.tar.gz"
    fd = os.open(tarball, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the secret
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        tar.add(root, arcname=root.name)
    return tarball
