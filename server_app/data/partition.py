"""Seeded federated partitions: IID or Dirichlet(alpha) label skew over devices, plus an
unlabeled proxy split held out of the training data (disjoint from every device and from test)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def iid_partition(n: int, num_devices: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_devices)]


def dirichlet_partition(
    labels: np.ndarray, num_devices: int, alpha: float, seed: int, min_samples: int = 10, max_tries: int = 100
) -> list[np.ndarray]:
    """Per class, split its indices over devices with proportions ~ Dir(alpha) (Hsu et al. 2019).

    Redraws until every device has >= min_samples (standard practice); raises if impossible.
    """
    labels = np.asarray(labels)
    if min_samples * num_devices > len(labels):
        raise ValueError(f"{num_devices} devices x {min_samples} samples > {len(labels)} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_samples:
            return out
    raise RuntimeError(f"no Dirichlet({alpha}) draw gave every device >= {min_samples} samples in {max_tries} tries")


@dataclass
class FederatedSplit:
    """Indices into the training arrays: one array per device, and the proxy set."""

    device_indices: list[np.ndarray]
    proxy_indices: np.ndarray

    def check_disjoint(self) -> None:
        allidx = np.concatenate([*self.device_indices, self.proxy_indices])
        if len(np.unique(allidx)) != len(allidx):
            raise AssertionError("device / proxy index sets overlap")


def make_federated_split(
    labels: np.ndarray,
    num_devices: int,
    proxy_size: int,
    seed: int,
    alpha: float | None = None,
    min_samples: int = 10,
    train_size: int | None = None,
) -> FederatedSplit:
    """Hold out `proxy_size` random training samples as the (unlabeled) proxy set, optionally keep
    only `train_size` of the rest for devices, and partition those (IID if alpha is None)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    proxy, rest = np.sort(perm[:proxy_size]), perm[proxy_size:]
    if train_size is not None:
        rest = rest[:train_size]
    sub_seed = int(rng.integers(2**31))
    if alpha is None:
        local = iid_partition(len(rest), num_devices, sub_seed)
    else:
        local = dirichlet_partition(labels[rest], num_devices, alpha, sub_seed, min_samples)
    split = FederatedSplit([np.sort(rest[p]) for p in local], proxy)
    split.check_disjoint()
    return split
