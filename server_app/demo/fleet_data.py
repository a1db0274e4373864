"""Writes what a demo/test fleet needs on disk: the proxy set, the server's test set, one private
`.npz` per device (Dirichlet(alpha) label skew) and one device config per device.

Why files: devices are separate OS processes (and, in production, separate machines); they read
their private data and the shared proxy inputs from disk exactly as a provisioned device would,
and check the proxy file's sha256 against the value the server also knows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.config import file_sha256


@dataclass
class FleetLayout:
    run_dir: str
    dataset: str
    input_shape: list[int]
    num_classes: int
    proxy_path: str
    proxy_sha256: str
    proxy_size: int
    test_path: str
    device_test_path: str
    devices: list[dict[str, Any]] = field(default_factory=list)  # {device_id, arch, data_path, config_path, n}

    def save(self) -> Path:
        p = Path(self.run_dir) / "fleet.json"
        p.write_text(json.dumps(asdict(self), indent=1))
        return p


def _savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def prepare_fleet(
    run_dir: str | Path,
    *,
    dataset: str = "digits",
    devices: int = 5,
    alpha: float | None = 0.5,
    proxy_size: int = 300,
    train_size: int | None = None,
    test_size: int | None = None,
    device_test_size: int = 300,
    archs: list[str] | None = None,
    seed: int = 0,
    broker_url: str = "mqtt://127.0.0.1:1883",
    data_dir: str | None = None,
    device_overrides: dict[str, Any] | None = None,
) -> FleetLayout:
    """Split `dataset`, write the files and one `devices/<id>/config.json` per device."""
    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split

    run = Path(run_dir)
    ds = load_dataset(dataset, data_dir=data_dir, seed=seed)
    split = make_federated_split(ds.y_train, devices, proxy_size, seed, alpha=alpha, train_size=train_size)
    proxy = run / "data" / "proxy.npz"
    _savez(proxy, x=ds.x_train[split.proxy_indices])
    rng = np.random.default_rng(seed + 7)
    te = rng.permutation(len(ds.y_test))
    te_server = te[:test_size] if test_size else te
    test = run / "data" / "test.npz"
    _savez(test, x=ds.x_test[te_server], y=ds.y_test[te_server])
    dev_test = run / "data" / "device_test.npz"  # what devices report held-out accuracy on
    _savez(dev_test, x=ds.x_test[te[:device_test_size]], y=ds.y_test[te[:device_test_size]])
    layout = FleetLayout(
        run_dir=str(run), dataset=ds.name, input_shape=list(ds.input_shape), num_classes=ds.num_classes,
        proxy_path=str(proxy), proxy_sha256=file_sha256(proxy), proxy_size=int(len(split.proxy_indices)),
        test_path=str(test), device_test_path=str(dev_test),
    )  # fmt: skip
    archs = archs or ["cnn_small"]
    for i, idx in enumerate(split.device_indices):
        dev = f"dev{i:03d}"
        ddir = run / "devices" / dev
        data = ddir / "private.npz"
        _savez(data, x=ds.x_train[idx], y=ds.y_train[idx])
        cfg = {
            "device_id": dev, "arch": archs[i % len(archs)], "data_path": str(data), "proxy_path": str(proxy),
            "proxy_sha256": layout.proxy_sha256, "test_path": str(dev_test), "state_dir": str(ddir / "state"),
            "broker_url": broker_url, "num_threads": 1, **(device_overrides or {}),
        }  # fmt: skip
        cfg_path = ddir / "config.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        layout.devices.append({"device_id": dev, "arch": cfg["arch"], "data_path": str(data),
                               "config_path": str(cfg_path), "n": int(len(idx))})  # fmt: skip
    layout.save()
    return layout
