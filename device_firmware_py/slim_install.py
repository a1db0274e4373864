"""Make a device venv small: delete what the agent never loads, then precompile what it does.

    python -m device_firmware_py.slim_install VENV

Run once by the bundle's `install-venv.sh`, as root, right after the offline install. Why: a
Raspberry-Pi-class device has a few GB of SD card and installs over slow links; the wheels carry
test suites, NPU compiler plugins, a WebGPU accelerator, command-line tools and pip itself, none of
which a running agent touches. What is removed is listed below, each with why it is safe; the
device tests run the whole round (train, distill, logits, int8 re-quantization) in a slimmed venv.

Byte code: the wheels are installed with `--no-compile`, and the systemd unit runs the agent with
a read-only /opt (ProtectSystem=strict), so it could never write `__pycache__` itself. Here the
modules the agent and its quantizer child import are imported once, which writes byte code for
exactly those (a fraction of compiling every file, and no compile on each start).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

# (glob under site-packages, why it is never loaded by the agent)
PRUNE: tuple[tuple[str, str], ...] = (
    ("numpy/**/tests", "numpy's own test suites"),
    ("numpy/f2py", "Fortran wrapper generator (build time)"),
    ("numpy/distutils", "build-time helpers (older numpy)"),
    ("numpy/_pyinstaller", "PyInstaller hooks"),
    ("ai_edge_litert/libLiteRtWebGpuAccelerator.so", "GPU accelerator, loaded only when asked for"),
    ("ai_edge_litert/vendors", "NPU compiler/dispatch plugins (Qualcomm, MediaTek, ...)"),
    ("ai_edge_litert/tools/apply_plugin_main", "NPU plugin command-line tool"),
    ("ai_edge_litert/aot", "ahead-of-time NPU compilation"),
    ("ai_edge_quantizer/**/*_test.py", "the quantizer's test files"),
    ("pip", "installer; a new bundle re-creates the venv"),
    ("pip-*.dist-info", "installer metadata"),
    ("setuptools", "build tool"),
    ("setuptools-*.dist-info", "build tool metadata"),
    ("pkg_resources", "setuptools runtime"),
    ("_distutils_hack", "setuptools shim"),
    ("distutils-precedence.pth", "setuptools shim"),
)
# what the agent process and its int8 quantizer child import (precompiled here)
WARM_IMPORTS = (
    "device_firmware_py.cli",
    "device_firmware_py.agent.agent",
    "device_firmware_py.serving.local_api",
    "device_firmware_py.runtime.small_model",
    "device_firmware_py.runtime.quantize",
    "ai_edge_litert.interpreter",
)
WARM_QUANTIZER = (
    "from device_firmware_py.runtime.quantize import import_quantizer; import_quantizer()"
)


@lru_cache(maxsize=1)
def _prune_regex() -> re.Pattern[str]:
    parts = []
    for pattern, _why in PRUNE:
        rx = re.escape(pattern).replace(r"/\*\*/", "/(?:.*/)?").replace(r"\*", "[^/]*")
        parts.append(rx)
    return re.compile(rf"^(?:{'|'.join(parts)})(?:/.*)?$")


def is_pruned(relpath: str) -> bool:
    """True when `relpath` (relative to site-packages, or a wheel member) is in or under a PRUNE match."""
    return bool(_prune_regex().match(relpath))


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise FileNotFoundError(f"{venv}: no lib/python3*/site-packages (not a venv?)")
    return found[0]


def prune(venv: Path) -> int:
    """Delete PRUNE's matches; return the bytes freed."""
    site = site_packages(venv)
    freed = 0
    for path in sorted(site.rglob("*")):
        if not path.exists() and not path.is_symlink():
            continue  # under a directory removed above
        if not is_pruned(path.relative_to(site).as_posix()):
            continue
        if path.is_dir() and not path.is_symlink():
            freed += tree_bytes(path)
            shutil.rmtree(path)
        else:
            freed += path.lstat().st_size
            path.unlink()
    for script in venv.glob("bin/pip*"):
        script.unlink()
    return freed


def warm(venv: Path) -> None:
    """Import what the agent uses with the venv's interpreter so its byte code is written now."""
    py = venv / "bin" / "python"
    code = "; ".join(f"import {m}" for m in WARM_IMPORTS) + "; " + WARM_QUANTIZER
    subprocess.run([str(py), "-c", code], check=True, capture_output=True, timeout=600)


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (symlinks not followed): what an install occupies."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m device_firmware_py.slim_install", description=__doc__.splitlines()[0])
    p.add_argument("venv", type=Path)
    p.add_argument("--no-warm", action="store_true", help="do not precompile the agent's imports")
    args = p.parse_args(argv)
    freed = prune(args.venv)
    if not args.no_warm:
        warm(args.venv)
    print(f"[slim] removed {freed / 2**20:.1f} MiB; venv now {tree_bytes(args.venv) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
