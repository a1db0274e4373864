"""The data files a KOALA fleet runs on, from one data set and one partition.

    proxy.npz            x only: the unlabeled proxy inputs (server and every device hold the same bytes)
    proxy_labels.npz     y: labels of a few proxy rows the server knows (-1 elsewhere), never sent to devices
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


def canary_labels(y_proxy: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Labels of `count` seeded proxy rows, -1 for the others: what the server may know of its proxy
    set (a few hand-labeled examples) to judge devices by (engine.robust.canary_filter). The
    simulator and `koala data prepare` both pick through here, so they label the same rows."""
    y = np.full(len(y_proxy), -1, np.int64)
    if count > 0:
        rows = np.random.default_rng([seed, 31]).choice(len(y_proxy), min(count, len(y_proxy)), replace=False)
        y[rows] = np.asarray(y_proxy)[rows]
    return y


def default_labeled_proxy(proxy_size: int) -> int:
    """How many proxy rows `koala data prepare` labels unless told (`--labeled-proxy`): 10 % of the
    proxy set, at least 30, at most all of it. Why by default: without known labels the canary
    filter abstains, and in the first rounds of a non-IID fleet the agreement filter abstains too
    (honest devices do not agree yet), so round 0 was an attacker's window (issue 28: over the
    broker, a sign-flipped model of 2 of 5 devices got into round 0). `prepare` splits a labeled
    data set, so knowing a few proxy labels costs nothing; they stay on the server."""
    return min(int(proxy_size), max(30, int(proxy_size) // 10))


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
    proxy_labels_path: str | None
    proxy_labeled: int
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
        np.savez(f, **arrays)  # type: ignore[arg-type]  # the stub maps **arrays onto allow_pickle: bool


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
    labeled_proxy: int = 0,
) -> tuple[PreparedData, np.ndarray, Any]:
    """Split `dataset` over `device_ids` and write the files; returns (what was written, the test
    set's seeded order, the loaded data set) so callers can cut further test slices from it.
    `labeled_proxy` > 0 also writes proxy_labels.npz with that many known labels."""
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
    labels_path = root / "proxy_labels.npz"
    if labeled_proxy > 0:
        savez(labels_path, y=canary_labels(ds.y_train[split.proxy_indices], labeled_proxy, seed))
    else:
        labels_path.unlink(missing_ok=True)
    order = np.random.default_rng(seed + 7).permutation(len(ds.y_test))
    te = order[:test_size] if test_size else order
    test = root / "test.npz"
    savez(test, x=ds.x_test[te], y=ds.y_test[te])
    prepared = PreparedData(
        out=str(root), dataset=ds.name, input_shape=list(ds.input_shape), num_classes=ds.num_classes,
        seed=seed, alpha=alpha, proxy_path=str(proxy), proxy_sha256=file_sha256(proxy),
        proxy_size=int(len(split.proxy_indices)),
        proxy_labels_path=str(labels_path) if labeled_proxy > 0 else None,
        proxy_labeled=min(labeled_proxy, int(len(split.proxy_indices))) if labeled_proxy > 0 else 0,
        test_path=str(test), test_size=int(len(te)),
    )  # fmt: skip
    where = device_path or (lambda dev: root / "devices" / f"{dev}.npz")
    for dev, idx in zip(device_ids, split.device_indices, strict=True):
        path = where(dev)
        y = ds.y_train[idx]
        savez(path, x=ds.x_train[idx], y=y)
        counts = np.bincount(y, minlength=ds.num_classes).astype(int).tolist()
        prepared.devices.append({"device_id": dev, "path": str(path), "n": int(len(idx)), "label_counts": counts})
    return prepared, order, ds
