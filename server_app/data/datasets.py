"""Real data-set loaders. Images come back float32 NHWC in [0, 1] (optionally normalized), labels int64.

- digits: sklearn's bundled 8x8 digits (1,797 images) — fast tests; split train/test by seed.
- fashion-mnist / mnist: standard IDX files (gzipped or not) from a directory; the default is the
  Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/).
- cifar10: the standard python-pickle batches (data_batch_1..5, test_batch) from a directory.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_DIR = Path("/usr/share/datasets/mnist")
CIFAR10_DIR = Path("/usr/share/datasets/cifar-10-batches-py")
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")

_IDX_DTYPES: dict[int, DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # [N, H, W, C] float32
    y_train: np.ndarray  # [N] int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int = 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)

    def summary(self) -> dict:
        return {
            "name": self.name, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
            "train": int(len(self.y_train)), "test": int(len(self.y_test)),
            "train_label_counts": np.bincount(self.y_train, minlength=self.num_classes).tolist(),
        }  # fmt: skip


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtype, ndim = raw[2], raw[3]
    if dtype not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype 0x{dtype:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[dtype], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} elements, found {data.size}")
    return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    """`train-images-idx3-ubyte` with any of the usual spellings (.gz, '.' for '-')."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            p = directory / f"{name}{suffix}"
            if p.exists():
                return p
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}")


def load_idx_dir(directory: str | Path, name: str = "fashion-mnist") -> Dataset:
    d = Path(directory)
    xs = {s: read_idx(_find(d, f"{p}-images-idx3-ubyte")) for s, p in (("train", "train"), ("test", "t10k"))}
    ys = {s: read_idx(_find(d, f"{p}-labels-idx1-ubyte")) for s, p in (("train", "train"), ("test", "t10k"))}
    return Dataset(
        name,
        (xs["train"].astype(np.float32) / 255.0)[..., None], ys["train"].astype(np.int64),
        (xs["test"].astype(np.float32) / 255.0)[..., None], ys["test"].astype(np.int64),
    )  # fmt: skip


def load_cifar10_dir(directory: str | Path) -> Dataset:
    """CIFAR-10 python batches: each a pickle of {b'data': uint8[N, 3072] (CHW), b'labels': [N]}."""
    d = Path(directory)

    def batch(p: Path) -> tuple[np.ndarray, np.ndarray]:
        with open(p, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
        data = np.asarray(obj[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(obj.get(b"labels", obj.get(b"fine_labels")), np.int64)
        return data.astype(np.float32) / 255.0, labels

    train_files = sorted(d.glob("data_batch_*"))
    if not train_files or not (d / "test_batch").exists():
        raise FileNotFoundError(f"no CIFAR-10 python batches (data_batch_1..5, test_batch) in {d}")
    parts = [batch(p) for p in train_files]
    xt, yt = batch(d / "test_batch")
    return Dataset("cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), xt, yt)


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    b = sk_digits()
    x = (b.images.astype(np.float32) / 16.0)[..., None]
    y = b.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te])


def normalize(ds: Dataset) -> Dataset:
    """Per-channel standardization with train statistics (optional; small models expect [0,1])."""
    mean = ds.x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = ds.x_train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
    f = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return Dataset(ds.name, f(ds.x_train), ds.y_train, f(ds.x_test), ds.y_test, ds.num_classes)


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0, normalized: bool = False) -> Dataset:
    """Load a data set by name; `data_dir` overrides the default directory."""
    name = name.lower().replace("_", "-")
    if name == "digits":
        ds = load_digits(seed)
    elif name in ("fashion-mnist", "fmnist"):
        ds = load_idx_dir(data_dir or FMNIST_DIR, "fashion-mnist")
    elif name == "mnist":
        ds = load_idx_dir(data_dir or MNIST_DIR, "mnist")
    elif name in ("cifar10", "cifar-10"):
        ds = load_cifar10_dir(data_dir or CIFAR10_DIR)
    else:
        raise ValueError(f"unknown data set {name!r}; known: {DATASETS}")
    return normalize(ds) if normalized else ds
