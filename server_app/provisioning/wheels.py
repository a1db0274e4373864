"""The offline wheelhouse a device installs from: this project as a wheel + its `device` extra.

A field device may have no route to a package index (or a slow, metered one), so the bundle
carries every wheel and a `requirements.lock` with the exact versions that were downloaded; the
device runs `pip install --no-index --find-links wheels -r requirements.lock`. For a device of
another CPU/Python (a Raspberry Pi is aarch64), pass `platform`/`python_version`: pip then fetches
binary wheels for that target instead of this host's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DIST = "koala-edge"
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-")


@dataclass(frozen=True)
class Target:
    """Which interpreter/CPU the wheels are for; all None = this host."""

    platform: str | None = None  # e.g. manylinux2014_aarch64
    python_version: str | None = None  # e.g. 3.11

    def pip_args(self) -> list[str]:
        if not (self.platform or self.python_version):
            return []
        args = ["--only-binary=:all:"]
        if self.platform:
            args += ["--platform", self.platform]
        if self.python_version:
            args += ["--python-version", self.python_version, "--implementation", "cp"]
        return args


def device_requirements() -> list[str]:
    """The `device` extra's requirement strings, from the installed distribution's metadata."""
    reqs = []
    for req in metadata.requires(DIST) or []:
        spec, _, marker = req.partition(";")
        if re.search(r"""extra\s*==\s*["']device["']""", marker):
            reqs.append(spec.strip())
    if not reqs:
        raise RuntimeError(
            f"no 'device' extra found in {DIST} metadata; reinstall the project (pip install -e .)"
        )
    return reqs


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def build_project_wheel(out: Path, project_root: Path = PROJECT_ROOT) -> Path:
    """`pip wheel . --no-deps` of this project (pure Python: one wheel fits every device)."""
    out.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(project_root))
    wheels = sorted(out.glob("koala_edge-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise RuntimeError("pip wheel produced no koala_edge wheel")
    return wheels[-1]


def download_device_wheels(out: Path, target: Target = Target()) -> list[Path]:
    """Binary wheels of the device extra and everything it pulls in, for `target`."""
    out.mkdir(parents=True, exist_ok=True)
    _pip("download", "--quiet", "-d", str(out), *target.pip_args(), *device_requirements())
    return sorted(p for p in out.glob("*.whl") if not p.name.startswith("koala_edge-"))


def write_lock(wheels: list[Path], path: Path) -> Path:
    """`name==version` for each downloaded wheel: what the device installs, exactly."""
    lines = []
    for w in wheels:
        m = _WHEEL_NAME.match(w.name)
        if m:
            lines.append(f"{m['name'].replace('_', '-')}=={m['version']}")
    path.write_text("\n".join(sorted(set(lines))) + "\n")
    return path
