"""Loaders (digits, IDX, CIFAR-10 pickle on generated files, Debian Fashion-MNIST) and partitions."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from server_app.data.datasets import FMNIST_DIR, load_cifar10_dir, load_dataset, load_idx_dir, read_idx
from server_app.data.partition import dirichlet_partition, iid_partition, make_federated_split


def _write_idx(path, arr, gz):
    hdr = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = hdr + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def test_digits():
    ds = load_dataset("digits")
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.x_train.min() >= 0 and ds.x_train.max() <= 1
    assert len(ds.y_train) + len(ds.y_test) == 1797


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_and_dir(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n), gz)
    assert read_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}").shape == (12,)
    ds = load_idx_dir(tmp_path, "mnist")
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.x_train.max() <= 1.0 and ds.y_test.dtype == np.int64


def test_cifar10_pickle_batches(tmp_path):
    rng = np.random.default_rng(1)
    chw = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": chw.reshape(4, -1), b"labels": [0, 1, 2, 3]}, f)
    ds = load_cifar10_dir(tmp_path)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    # NHWC: pixel (h=1, w=2) channel c equals the CHW source
    np.testing.assert_allclose(ds.x_test[0, 1, 2], chw[0, :, 1, 2] / 255.0, rtol=1e-6)
    assert ds.y_train.tolist()[:4] == [0, 1, 2, 3]


@pytest.mark.skipif(not FMNIST_DIR.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian():
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


def test_dirichlet_partition_disjoint_min_and_seeded():
    y = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(y, 8, 0.3, seed=3, min_samples=20)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) == len(y)
    assert min(len(p) for p in parts) >= 20
    again = dirichlet_partition(y, 8, 0.3, seed=3, min_samples=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # label skew: small alpha gives devices very uneven class mixes
    hist = np.array([np.bincount(y[p], minlength=10) for p in parts])
    assert (hist == 0).sum() > 0 or hist.max() > 3 * hist.mean()


def test_iid_partition_covers_everything():
    parts = iid_partition(103, 4, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))


def test_federated_split_proxy_disjoint():
    ds = load_dataset("digits")
    s = make_federated_split(ds.y_train, 5, 300, seed=0, alpha=0.5)
    s.check_disjoint()
    assert len(s.proxy_indices) == 300
    dev = set(np.concatenate(s.device_indices).tolist())
    assert dev.isdisjoint(s.proxy_indices.tolist())
    assert len(dev) + 300 == len(ds.y_train)
    capped = make_federated_split(ds.y_train, 5, 300, seed=0, alpha=None, train_size=500)
    assert sum(len(i) for i in capped.device_indices) == 500


def test_koala_data_prepare_writes_a_fleets_files(tmp_path, capsys):
    """`koala data prepare`: proxy (x only), test (x, y), one private file per manifest device;
    disjoint, the proxy digest recorded, every training image in at most one place."""
    import json

    from device_firmware_py.config import file_sha256
    from server_app.cli import main as koala

    manifest = tmp_path / "fleet.yml"
    manifest.write_text("broker: {url: 'mqtts://b:8883'}\ndevices:\n  - {id: pi-01, arch: cnn_small}\n"
                        "  - {id: pi-02, arch: mlp_tiny}\n  - {id: jet-01, arch: cnn_small}\n")  # fmt: skip
    out = tmp_path / "data"
    rc = koala(["data", "prepare", "--dataset", "digits", "--manifest", str(manifest), "--proxy-size", "200",
                "--alpha", "0.5", "--out", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pi-02" in printed and "paths.data_dir" in printed
    info = json.loads((out / "data.json").read_text())
    assert [d["device_id"] for d in info["devices"]] == ["pi-01", "pi-02", "jet-01"]
    assert info["proxy_sha256"] == file_sha256(out / "proxy.npz")
    with np.load(out / "proxy.npz") as z:
        assert list(z.keys()) == ["x"] and z["x"].shape == (200, 8, 8, 1)
    rows = [np.load(out / "proxy.npz")["x"].reshape(200, -1)]
    for d in info["devices"]:
        with np.load(out / "devices" / f"{d['device_id']}.npz") as z:
            assert len(z["y"]) == d["n"] == sum(d["label_counts"]) and len(z["x"]) == d["n"]
            rows.append(z["x"].reshape(d["n"], -1))
    with np.load(out / "test.npz") as z:
        assert set(z.keys()) == {"x", "y"} and len(z["y"]) == info["test_size"]
    train = np.concatenate(rows)
    ds = load_dataset("digits")
    assert len(train) <= len(ds.y_train)
    # the same seed gives the same files (a re-run does not reshuffle a fleet's data)
    assert koala(["data", "prepare", "--dataset", "digits", "--manifest", str(manifest), "--proxy-size", "200",
                  "--out", str(tmp_path / "again")]) == 0  # fmt: skip
    assert file_sha256(tmp_path / "again" / "proxy.npz") == info["proxy_sha256"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset", "nope", "--devices", "2"], "unknown data set"),
        (["--dataset", "digits", "--devices", "bad id!"], "device id"),
        (["--dataset", "digits", "--devices", "a,a"], "unique"),
        (["--dataset", "digits", "--manifest", "/nonexistent/fleet.yml"], "No such file"),
    ],
)
def test_koala_data_prepare_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    from server_app.cli import main as koala

    assert koala(["data", "prepare", *argv, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_koala_data_prepare_labels_a_few_proxy_rows_by_default(tmp_path):
    """The production path sets up the canary filter's labeled proxy rows unless told not to
    (issue 28: without them round 0 had no judge): 10 % of the proxy, at least 30, server only;
    `--labeled-proxy 0` writes none (and removes an earlier file)."""
    import json

    from server_app.cli import main as koala
    from server_app.data.prepare import default_labeled_proxy

    assert [default_labeled_proxy(n) for n in (20, 200, 1000, 5000)] == [20, 30, 100, 500]
    out = tmp_path / "data"
    argv = ["data", "prepare", "--dataset", "digits", "--devices", "3", "--proxy-size", "200", "--out", str(out)]
    assert koala(argv) == 0
    with np.load(out / "proxy_labels.npz") as z:
        y = z["y"]
    with np.load(out / "proxy.npz") as z:
        assert len(y) == len(z["x"]) == 200 and list(z.keys()) == ["x"]  # labels never in the devices' file
    assert int((y >= 0).sum()) == 30 and set(y[y >= 0].tolist()) <= set(range(10))
    assert json.loads((out / "data.json").read_text())["proxy_labeled"] == 30
    assert koala([*argv, "--labeled-proxy", "0"]) == 0
    assert not (out / "proxy_labels.npz").exists()
