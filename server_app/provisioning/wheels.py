"""The offline wheelhouse a device installs from: the device-only agent wheel + its dependencies.

A field device may have no route to a package index (or a slow, metered one), so the bundle
carries every wheel and a `requirements.lock` with the exact versions that were downloaded; the
device runs `pip install --no-index --no-deps --find-links wheels -r requirements.lock`. For a
device of another CPU/Python (a Raspberry Pi is aarch64), pass `platform`/`python_version`: pip
then fetches binary wheels for that target instead of this host's.

`--no-deps` because the lock is the whole, exact closure, minus `DEVICE_EXCLUDED`: packages that
the `device` extra's dependencies declare but that the agent never imports (scipy alone is 113 MB
installed, more than everything else together). What proves each exclusion is named next to it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DIST = "koala-edge"
# Declared by ai-edge-quantizer, never imported on the device's path:
DEVICE_EXCLUDED: dict[str, str] = {
    # imported only by the quantizer's GPTQ algorithm; the agent runs the static int8 recipe, and
    # its quantizer child stubs `scipy.linalg` when absent (device_firmware_py.runtime.quantize):
    # the int8 models are byte-identical with and without scipy (tests/device_firmware_py/test_device_venv.py)
    "scipy": "GPTQ only",
    # the LiteRT-LM container builder (language-model bundles); not imported by the quantizer's API
    "litert-lm-builder": "LiteRT-LM containers only",
}
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-")


@dataclass(frozen=True)
class Target:
    """Which interpreter/CPU the wheels are for; all None = this host."""

    platform: str | None = None  # e.g. manylinux_2_36_aarch64 (the device's glibc 2.36, arm64)
    python_version: str | None = None  # e.g. 3.11

    def platform_tags(self) -> list[str]:
        """`platform` and every older manylinux tag its glibc runs: pip's --platform matches tags
        exactly, so `manylinux_2_36_aarch64` (Raspberry Pi OS bookworm) alone would not find a
        wheel tagged `manylinux_2_27_aarch64` that the device can run."""
        if not self.platform:
            return []
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", self.platform)
        if not m:
            return [self.platform]
        major, minor, arch = int(m[1]), int(m[2]), m[3]
        tags = [f"manylinux_{major}_{y}_{arch}" for y in range(minor, 16, -1)]
        if major == 2 and minor >= 17:
            tags.append(f"manylinux2014_{arch}")
        return tags

    def pip_args(self) -> list[str]:
        if not (self.platform or self.python_version):
            return []
        args = ["--only-binary=:all:"]
        for tag in self.platform_tags():
            args += ["--platform", tag]
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


def _dist_name(wheel: Path) -> str:
    m = _WHEEL_NAME.match(wheel.name)
    return m["name"].replace("_", "-").lower() if m else ""


def download_device_wheels(out: Path, target: Target = Target()) -> list[Path]:
    """Binary wheels of the device extra and everything it pulls in, for `target`, without the
    packages in DEVICE_EXCLUDED (downloaded with the closure, then deleted)."""
    out.mkdir(parents=True, exist_ok=True)
    _pip("download", "--quiet", "-d", str(out), *target.pip_args(), *device_requirements())
    kept = []
    for w in sorted(out.glob("*.whl")):
        if w.name.startswith("koala_edge"):
            continue
        if _dist_name(w) in DEVICE_EXCLUDED:
            w.unlink()
        else:
            slim_wheel(w)
            kept.append(w)
    return kept


def write_lock(wheels: list[Path], path: Path) -> Path:
    """`name==version` for each downloaded wheel: what the device installs, exactly."""
    lines = []
    for w in wheels:
        m = _WHEEL_NAME.match(w.name)
        if m:
            lines.append(f"{m['name'].replace('_', '-')}=={m['version']}")
    path.write_text("\n".join(sorted(set(lines))) + "\n")
    return path


def slim_wheel(wheel: Path) -> int:
    """Rewrite `wheel` in place without the members the device never loads (the same list the
    device's install applies: device_firmware_py.slim_install.PRUNE); return the bytes saved.

    Why at bundle time too: the bundle travels over the device's link, and LiteRT's wheel alone
    carries ~30 MB of GPU/NPU plugins and tools. RECORD loses the removed members' lines, so pip
    installs the slimmed wheel as it would the original. A wheel with nothing to remove is untouched.
    """
    from device_firmware_py.slim_install import is_pruned

    with zipfile.ZipFile(wheel) as zin:
        members = zin.infolist()
        drop = {m.filename for m in members if is_pruned(m.filename)}
        if not drop:
            return 0
        before = wheel.stat().st_size
        tmp = wheel.with_suffix(".slim-tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for m in members:
                if m.filename in drop:
                    continue
                data = zin.read(m)
                if m.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(ln for ln in lines if ln.split(",", 1)[0] not in drop) + "\n").encode()
                zout.writestr(m, data, compress_type=zipfile.ZIP_DEFLATED)
    shutil.move(tmp, wheel)
    return before - wheel.stat().st_size


def build_device_wheelhouse(dest: Path, target: Target = Target()) -> Path:
    """Everything a device installs offline, in `dest`: the slimmed dependency wheels, their
    `requirements.lock`, and the device-only agent wheel. Returns the lock's path."""
    from server_app.provisioning.device_wheel import build_device_wheel

    deps = download_device_wheels(dest, target)
    lock = write_lock(deps, dest / "requirements.lock")
    build_device_wheel(dest, device_requirements())
    return lock
