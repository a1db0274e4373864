"""The bounded on-device sample store and the spool directory (device_firmware_py.serving).

Proves: newest-N and per-class bounds; every kind of bad batch (shape, dtype, label, NaN, count)
is refused with a message naming the problem and stores nothing; the store survives a restart;
a snapshot does not change when samples are added later; spool files are accepted or rejected
(with a reason file), and the spool keeps a bounded number of files; the device config reads
data_source = store without a data file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_firmware_py.serving.sample_store import SampleError, SampleStore, validate_samples
from device_firmware_py.serving.spool import scan_spool

SHAPE = (8, 8, 1)


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def test_newest_n_and_per_class_cap(tmp_path):
    s = SampleStore(tmp_path, SHAPE, 10, max_samples=10, max_per_class=3)
    x = _x(8)
    res = s.add(x, np.zeros(8, int))  # 8 samples of class 0: only the newest 3 stay
    assert res["accepted"] == 8 and res["evicted"] == 5 and res["num_samples"] == 3
    np.testing.assert_array_equal(s.snapshot().x, x[5:])
    s.add(_x(9, 1), np.arange(9) % 3 + 1)  # classes 1..3, 3 each -> 12 > 10: the oldest go
    snap = s.snapshot()
    assert len(snap) == 10 and max(snap.histogram(10)) <= 3
    assert snap.histogram(10)[0] == 1  # two of the three class-0 samples were the oldest overall
    assert s.stats()["evicted_total"] == 5 + 2


@pytest.mark.parametrize(
    ("x", "y", "words"),
    [
        (_x(4), [0, 1, 2, 10], "label 10 out of range"),
        (_x(4), [0, 1, -1, 2], "label -1 out of range"),
        (_x(4), [0, 1, 2], "4 inputs but 3 labels"),
        ((_x(4) * 255).astype(np.uint8), [0, 1, 2, 3], "dtype uint8"),
        (_x(4), [0.5, 1, 2, 3], "non-integer"),
        (_x(4), ["a", "b", "c", "d"], "labels must be integer"),
        (np.zeros((4, 9, 8, 1), np.float32), [0, 1, 2, 3], "shape [4, 9, 8, 1]"),
        (np.zeros((4, 8, 8, 3), np.float32), [0, 1, 2, 3], "the model takes [N, 8, 8, 1]"),
        (np.full((2, *SHAPE), np.nan, np.float32), [0, 1], "NaN"),
        (np.zeros((0, *SHAPE), np.float32), [], "no samples"),
    ],
)
def test_bad_batches_are_refused_and_store_nothing(tmp_path, x, y, words):
    s = SampleStore(tmp_path, SHAPE, 10)
    s.add(_x(2), [1, 2])
    with pytest.raises(SampleError) as err:
        s.add(x, y)
    assert words in str(err.value), str(err.value)
    assert len(s) == 2 and SampleStore(tmp_path, SHAPE, 10).histogram() == s.histogram()


def test_shapes_accepted_and_max_batch():
    x, y = validate_samples(np.zeros(SHAPE, np.float64), 3, SHAPE, 10)  # one sample, float64 -> float32
    assert x.shape == (1, *SHAPE) and x.dtype == np.float32 and y.tolist() == [3]
    x, _ = validate_samples(np.zeros((5, 8, 8), np.float16), np.arange(5), SHAPE, 10)  # channel axis left out
    assert x.shape == (5, *SHAPE)
    with pytest.raises(SampleError, match="at most 4"):
        validate_samples(np.zeros((5, *SHAPE), np.float32), np.arange(5), SHAPE, 10, max_batch=4)


def test_persisted_and_snapshot_is_stable(tmp_path):
    s = SampleStore(tmp_path, SHAPE, 10, max_samples=100)
    s.add(_x(5), [0, 1, 2, 3, 4])
    snap = s.snapshot()
    s.add(_x(3, 1), [5, 6, 7])
    assert len(snap) == 5 and len(s.snapshot()) == 8  # the round's snapshot did not move
    with pytest.raises(ValueError):
        snap.x[0, 0, 0, 0] = 1.0  # read-only: nobody changes a snapshot in place
    again = SampleStore(tmp_path, SHAPE, 10, max_samples=4)  # restart with a smaller bound: applied at load
    assert len(again) == 4 and again.snapshot().y.tolist() == [4, 5, 6, 7]
    # a store of another model's shape is set aside, not crash-looped on
    other = SampleStore(tmp_path, (28, 28, 1), 10)
    assert len(other) == 0 and (tmp_path / "samples.npz.unreadable").is_file()


def test_spool_accepts_rejects_and_bounds(tmp_path):
    store = SampleStore(tmp_path / "store", SHAPE, 10)
    spool = tmp_path / "spool"
    spool.mkdir()
    np.savez(spool / "good.npz", x=_x(6), y=np.arange(6))
    np.savez(spool / "badlabel.npz", x=_x(2), y=np.array([1, 11]))
    np.savez(spool / "nolabels.npz", x=_x(2))
    (spool / "garbage.npz").write_bytes(b"not a zip")
    np.savez(spool / ".inflight.npz", x=_x(2), y=np.array([1, 2]))  # being written: ignored
    out = {r["file"]: r for r in scan_spool(spool, store, keep=2)}
    assert out["good.npz"]["ok"] and len(store) == 6
    assert not out["badlabel.npz"]["ok"] and "label 11 out of range" in out["badlabel.npz"]["reason"]
    assert "lacks ['y']" in (spool / "rejected" / "nolabels.npz.reason.txt").read_text()
    assert "not a readable .npz" in out["garbage.npz"]["reason"]
    assert ".inflight.npz" not in out and (spool / ".inflight.npz").is_file()
    assert (spool / "accepted" / "good.npz").is_file()
    assert len(list((spool / "rejected").glob("*.npz"))) == 2  # keep=2: the oldest rejected file went
    assert len(list((spool / "rejected").glob("*.reason.txt"))) == 2


def test_config_store_needs_no_data_file(tmp_path):
    from device_firmware_py.config import ConfigError, DeviceConfig

    p = tmp_path / "d.json"
    p.write_text(json.dumps({"device_id": "d1", "proxy_path": "p.npz", "state_dir": str(tmp_path / "s"),
                             "data_source": "store", "store_max_samples": 50}))  # fmt: skip
    cfg = DeviceConfig.load(p, env={})
    assert cfg.data_path == "" and cfg.store_max_samples == 50
    assert cfg.socket_path == str(tmp_path / "s" / "agent.sock")
    assert DeviceConfig.load(p, env={"KOALA_DEVICE_SERVE_SOCKET": "off"}).socket_path == ""
    p.write_text(json.dumps({"device_id": "d1", "proxy_path": "p", "state_dir": "s", "data_path": "a", "data_source": "cloud"}))
    with pytest.raises(ConfigError, match="data_source must be file or store"):
        DeviceConfig.load(p, env={})
    p.write_text(json.dumps({"device_id": "d1", "proxy_path": "p", "state_dir": "s", "data_path": "",
                             "serve_socket": "/" + "x" * 120}))  # fmt: skip
    with pytest.raises(ConfigError, match="data_path is required"):
        DeviceConfig.load(p, env={})
    p.write_text(json.dumps({"device_id": "d1", "proxy_path": "p", "state_dir": "s", "data_path": "a",
                             "serve_socket": "/" + "x" * 120}))  # fmt: skip
    with pytest.raises(ConfigError, match="Unix socket path must be <= 107"):
        DeviceConfig.load(p, env={})
