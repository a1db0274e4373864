"""Device install size: one real bundle, built and installed as a fleet gets it, against the old way.

Measured in the same run:
  bundle      `build_bundle` for one cnn_small device with the demo's proxy (1,000 Fashion-MNIST
              images): the tarball a device downloads, and its wheelhouse
  installed   the bundle's own `install-venv.sh` into a staging root, offline: the venv's bytes
              (device-only agent wheel, the lock without scipy, slimmed wheels, pip removed, byte
              code for the agent's imports only), and how long it took
  baseline    `pip install .[device]` into a fresh venv: the project wheel (server_app included)
              with the device extra's whole closure (scipy included), byte code for every file
Ratios: installed / baseline. Goal (issue 16): bundle <= 40 MB, installed <= 100 MB.

    koala bench device_install
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, ratio, table, write_result
from device_firmware_py.slim_install import tree_bytes

MB = 1e6


def _offline_env() -> dict[str, str]:
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PYTHON=sys.executable)
    env.pop("PIP_FIND_LINKS", None)
    return env


def bundle_and_install(tmp: Path, proxy_size: int) -> dict[str, Any]:
    """One bundle as `koala provision bundle` builds it, installed by its install-venv.sh."""
    from server_app.provisioning.broker_files import ensure_pki
    from server_app.provisioning.bundle import BundleSpec, build_bundle

    rng = np.random.default_rng(0)
    proxy = tmp / "proxy.npz"
    np.savez(proxy, x=rng.random((proxy_size, 28, 28, 1), dtype=np.float32))
    ca = ensure_pki(tmp / "broker")
    t0 = time.perf_counter()
    tarball = build_bundle(
        BundleSpec(device_id="bench-01", arch="cnn_small", secret="x" * 43, broker_url="mqtts://broker.lan:8883",
                   ca_cert_pem=ca.read_bytes(), proxy=proxy),
        tmp / "bundles",
    )  # fmt: skip
    t_build = time.perf_counter() - t0
    bundle_dir = tarball.parent / "koala-bundle-bench-01"
    wheels = bundle_dir / "opt" / "koala" / "wheels"
    root = tmp / "device-root"
    t0 = time.perf_counter()
    res = subprocess.run(["bash", str(bundle_dir / "flash.sh"), "--target-root", str(root), "--in-place", "--install-venv"],
                         capture_output=True, text=True, timeout=900, env=_offline_env())  # fmt: skip
    t_install = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"flash.sh failed: {res.stderr[-1500:]}")
    venv = root / "opt" / "koala" / "venv"
    site = next((venv / "lib").glob("python3*/site-packages"))
    largest = sorted(((p.name, tree_bytes(p) if p.is_dir() else p.stat().st_size) for p in site.iterdir()), key=lambda kv: -kv[1])
    return {
        "bundle_tar_gz_bytes": tarball.stat().st_size,
        "wheelhouse_bytes": tree_bytes(wheels),
        "wheels": sorted(w.name for w in wheels.glob("*.whl")),
        "proxy_bytes": proxy.stat().st_size,
        "t_build_s": t_build,
        "installed_bytes": tree_bytes(venv),
        "t_flash_install_s": t_install,
        "largest_packages": largest[:6],
        "has_server_app": (site / "server_app").exists(),
        "has_scipy": (site / "scipy").exists(),
    }


def baseline_install(tmp: Path) -> dict[str, Any]:
    """The pre-bundle way: `pip install .[device]` into a fresh venv (server_app and scipy included)."""
    import venv

    env_dir = tmp / "baseline-venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    t0 = time.perf_counter()
    res = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", f"{REPO}[device]"],
                         capture_output=True, text=True, timeout=900, cwd=tmp)  # fmt: skip
    t_install = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"pip install .[device] failed: {res.stderr[-1500:]}")
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    return {"installed_bytes": tree_bytes(env_dir), "t_install_s": t_install, "has_scipy": (site / "scipy").exists()}


def run(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    from bench.common import DEFAULT_OUT, require_checkout

    require_checkout("koala bench device_install (its baseline is `pip install .[device]`)")

    started, load = time.time(), os.getloadavg()
    proxy_size = 1000
    with tempfile.TemporaryDirectory(prefix="koala-bench-devinstall-") as d:
        tmp = Path(d)
        slim = bundle_and_install(tmp, proxy_size)
        base = baseline_install(tmp)
        shutil.rmtree(tmp / "baseline-venv", ignore_errors=True)
    rows = [
        ["bundle (.tar.gz, with a 1,000-image proxy)", slim["bundle_tar_gz_bytes"] / MB, "-", "<= 40"],
        ["  of which wheels", slim["wheelhouse_bytes"] / MB, "-", ""],
        ["installed venv (bundle's install-venv.sh)", slim["installed_bytes"] / MB, slim["t_flash_install_s"], "<= 100"],
        ["baseline: pip install .[device]", base["installed_bytes"] / MB, base["t_install_s"], ""],
    ]
    print(table(["device install", "MB", "install s", "goal MB"], rows))
    ratios = {
        "installed/baseline": ratio(slim["installed_bytes"], base["installed_bytes"]),
        "install_time/baseline": ratio(slim["t_flash_install_s"], base["t_install_s"]),
    }
    print(f"\ninstalled / baseline: {ratios['installed/baseline']:.3f}")
    doc = write_result(
        "device_install", out or DEFAULT_OUT, quick=quick, params={"arch": "cnn_small", "proxy_size": proxy_size},
        raw={"bundle": slim, "baseline": base}, ratios=ratios, started=started, load_start=load,
        notes=["sizes are bytes of regular files (symlinks not followed); MB = 1e6 bytes",
               "both installs offline from this machine's package cache; x86-64 wheels"],
    )  # fmt: skip
    return doc


if __name__ == "__main__":
    run()
