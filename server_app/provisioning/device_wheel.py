"""The device agent as its own small wheel: `koala_edge_device-<version>-py3-none-any.whl`.

Why not `pip wheel .`: the project's wheel carries `server_app` (the server, its migrations, the
dashboard assets) next to `device_firmware_py`; a device needs only the latter. This module writes
a standard wheel (PEP 427: the files, `METADATA`, `WHEEL`, `entry_points.txt`, `RECORD` with
sha256 digests) holding `device_firmware_py` alone, so a device install holds no server code at
all, and an import of `server_app` on the device fails instead of silently working. The zip entries
carry a fixed timestamp, so the same sources give the same bytes (bundles can be compared).
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "device_firmware_py"
DIST_NAME = "koala-edge-device"
_SUFFIXES = {".py", ".tflite", ".json", ".yaml"}
_EPOCH = (2020, 1, 1, 0, 0, 0)  # zip needs a date >= 1980; a fixed one keeps the wheel reproducible


def _version() -> str:
    try:
        return metadata.version("koala-edge")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def package_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """Every file of the device package a device runs (sources, artifacts, the AsyncAPI file)."""
    pkg = root / PACKAGE
    return sorted(
        p for p in pkg.rglob("*")
        if p.is_file() and p.suffix in _SUFFIXES and "__pycache__" not in p.parts
    )  # fmt: skip


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _metadata_text(version: str, requires: list[str]) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {DIST_NAME}",
        f"Version: {version}",
        "Summary: KOALA Edge device agent: on-device LiteRT training, proxy logits over MQTT",
        "License: Apache-2.0",
        "Requires-Python: >=3.10",
        *(f"Requires-Dist: {r}" for r in requires),
    ]
    return "\n".join(lines) + "\n"


def build_device_wheel(out: Path, requires: list[str], root: Path = PROJECT_ROOT) -> Path:
    """Write the device-only wheel into `out`; `requires` becomes its Requires-Dist."""
    version = _version()
    name = DIST_NAME.replace("-", "_")
    dist_info = f"{name}-{version}.dist-info"
    entries: list[tuple[str, bytes]] = [
        (str(p.relative_to(root)).replace("\\", "/"), p.read_bytes()) for p in package_files(root)
    ]
    entries += [
        (f"{dist_info}/METADATA", _metadata_text(version, requires).encode()),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: koala-edge\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{dist_info}/entry_points.txt", b"[console_scripts]\nkoala-device = device_firmware_py.cli:main\n"),
    ]
    record = [f"{path},{_record_hash(data)},{len(data)}" for path, data in entries]
    record.append(f"{dist_info}/RECORD,,")
    entries.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}-*.whl"):
        old.unlink()
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, data in entries:
            info = zipfile.ZipInfo(path, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return wheel
