"""The data files a KOALA fleet runs on, from one data set and one partition.

    proxy.npz            x only: the unlabeled proxy inputs (server and every device hold the same bytes)
    test.npz             x, y: the server's held-out test set (large-model accuracy)
    devices/<id>.npz     x, y: one device's private training data (Dirichlet(alpha) label skew)
    data.json            what was written: data set, shapes, sizes, per-device label counts, proxy sha256

Why files: the server reads the proxy and test sets from `paths.data_dir`; each device reads its
private file and the proxy from its own disk, and checks the proxy's sha256 against the one the
server signs into every assignment. `koala data prepare` and the demo's fleet writer
(server_app.demo.fleet_data) both write through `prepare_data`, so the demo, the tests and a
staging fleet partition data the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.config import file_sha256


@dataclass
class PreparedData:
    out: str
    dataset: str
    input_shape: list[int]
    num_classes: int
    seed: int
    alpha: float | None
    proxy_path: str
    proxy_sha256: str
    proxy_size: int
    test_path: str
    test_size: int
    devices: list[dict[str, Any]] = field(default_factory=list)  # {device_id, path, n, label_counts}

    def save(self) -> Path:
        p = Path(self.out) / "data.json"
        p.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return p


def savez(path: Path, **arrays: np.ndarray) -> None:
    """np.savez to `path` (parents created), uncompressed so devices can memory-map it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def prepare_data(
    out: str | Path,
    *,
    dataset: str,
    device_ids: Sequence[str],
    alpha: float | None = 0.5,
    proxy_size: int = 1000,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    data_dir: str | None = None,
    device_path: Callable[[str], Path] | None = None,
) -> tuple[PreparedData, np.ndarray, Any]:
    """Split `dataset` over `device_ids` and write the files; returns (what was written, the test
    set's seeded order, the loaded data set) so callers can cut further test slices from it."""
    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split

    if not device_ids:
        raise ValueError("no devices to prepare data for")
    if len(set(device_ids)) != len(device_ids):
        raise ValueError("device ids must be unique")
    root = Path(out)
    ds = load_dataset(dataset, data_dir=data_dir, seed=seed)
    split = make_federated_split(ds.y_train, len(device_ids), proxy_size, seed, alpha=alpha, train_size=train_size)
    proxy = root / "proxy.npz"
    savez(proxy, x=ds.x_train[split.proxy_indices])
    order = np.random.default_rng(seed + 7).permutation(len(ds.y_test))
    te = order[:test_size] if test_size else order
    test = root / "test.npz"
    savez(test, x=ds.x_test[te], y=ds.y_test[te])
    prepared = PreparedData(
        out=str(root), dataset=ds.name, input_shape=list(ds.input_shape), num_classes=ds.num_classes,
        seed=seed, alpha=alpha, proxy_path=str(proxy), proxy_sha256=file_sha256(proxy),
        proxy_size=int(len(split.proxy_indices)), test_path=str(test), test_size=int(len(te)),
    )  # fmt: skip
    where = device_path or (lambda dev: root / "devices" / f"{dev}.npz")
    for dev, idx in zip(device_ids, split.device_indices, strict=True):
        path = where(dev)
        y = ds.y_train[idx]
        savez(path, x=ds.x_train[idx], y=y)
        counts = np.bincount(y, minlength=ds.num_classes).astype(int).tolist()
        prepared.devices.append({"device_id": dev, "path": str(path), "n": int(len(idx)), "label_counts": counts})
    return prepared, order, ds
