"""Writes what a demo/test fleet needs on disk: the proxy set, the server's test set, one private
`.npz` per device (Dirichlet(alpha) label skew; all three by server_app.data.prepare, as
`koala data prepare` writes them), a device test slice and one device config per device.

Why files: devices are separate OS processes (and, in production, separate machines); they read
their private data and the shared proxy inputs from disk exactly as a provisioned device would,
and check the proxy file's sha256 against the value the server also knows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server_app.data.prepare import prepare_data, savez


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
    proxy_labels_path: str | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)  # {device_id, arch, data_path, config_path, n}

    def save(self) -> Path:
        p = Path(self.run_dir) / "fleet.json"
        p.write_text(json.dumps(asdict(self), indent=1))
        return p


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
    labeled_proxy: int = 0,
) -> FleetLayout:
    """Split `dataset`, write the files and one `devices/<id>/config.json` per device."""
    run = Path(run_dir)
    ids = [f"dev{i:03d}" for i in range(devices)]
    data, order, ds = prepare_data(
        run / "data", dataset=dataset, device_ids=ids, alpha=alpha, proxy_size=proxy_size, seed=seed,
        train_size=train_size, test_size=test_size, data_dir=data_dir,
        device_path=lambda dev: run / "devices" / dev / "private.npz", labeled_proxy=labeled_proxy,
    )  # fmt: skip
    data.save()
    dev_test = run / "data" / "device_test.npz"  # what devices report held-out accuracy on
    savez(dev_test, x=ds.x_test[order[:device_test_size]], y=ds.y_test[order[:device_test_size]])
    layout = FleetLayout(
        run_dir=str(run), dataset=data.dataset, input_shape=data.input_shape, num_classes=data.num_classes,
        proxy_path=data.proxy_path, proxy_sha256=data.proxy_sha256, proxy_size=data.proxy_size,
        test_path=data.test_path, device_test_path=str(dev_test), proxy_labels_path=data.proxy_labels_path,
    )  # fmt: skip
    archs = archs or ["cnn_small"]
    for i, dev_data in enumerate(data.devices):
        dev = dev_data["device_id"]
        ddir = run / "devices" / dev
        cfg = {
            "device_id": dev, "arch": archs[i % len(archs)], "data_path": dev_data["path"],
            "proxy_path": data.proxy_path, "proxy_sha256": data.proxy_sha256, "test_path": str(dev_test),
            "state_dir": str(ddir / "state"), "broker_url": broker_url, "num_threads": 1, **(device_overrides or {}),
        }  # fmt: skip
        cfg_path = ddir / "config.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        layout.devices.append({"device_id": dev, "arch": cfg["arch"], "data_path": dev_data["path"],
                               "config_path": str(cfg_path), "n": dev_data["n"]})  # fmt: skip
    layout.save()
    return layout
