"""Devices as they are in the field (issue 17): memory-mapped data, the int8 quantizer in a child
process, a bounded progress rate, and a real agent round under a cgroup v1 memory + CPU limit.

The cgroup tests need root and cgroup v1 (`/sys/fs/cgroup/memory`, `/sys/fs/cgroup/cpu`); they
skip elsewhere. The harness is bench/device_class.py (the same code `koala bench device_class` runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from device_firmware_py.datafiles import load_small, open_array

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_npz_members_are_memory_mapped_from_a_cache(tmp_path):
    x = np.random.default_rng(0).random((50, 28, 28, 1), dtype=np.float32)
    y = np.arange(50) % 10
    np.savez(tmp_path / "d.npz", x=x, y=y)
    a = open_array(tmp_path / "d.npz", "x", tmp_path / "cache", float32=True)
    assert isinstance(a, np.memmap) and a.dtype == np.float32 and np.array_equal(a, x)
    assert np.array_equal(load_small(tmp_path / "d.npz", "y"), y)
    (cached,) = (tmp_path / "cache").glob("d-*.x.npy")
    assert str(open_array(tmp_path / "d.npz", "x", tmp_path / "cache").filename) == str(cached)  # reused
    np.savez(tmp_path / "d.npz", x=x[:10] * 2, y=y[:10])  # a replaced data file is converted again
    b = open_array(tmp_path / "d.npz", "x", tmp_path / "cache", float32=True)
    assert np.array_equal(b, x[:10] * 2) and len(list((tmp_path / "cache").glob("d-*.x.npy"))) == 1


def test_npy_proxy_and_float_conversion(tmp_path):
    x8 = (np.random.default_rng(1).random((20, 8, 8, 1)) * 255).astype(np.uint8)
    np.save(tmp_path / "p.npy", x8)
    a = open_array(tmp_path / "p.npy", "x", tmp_path / "cache", float32=True)
    assert isinstance(a, np.memmap) and a.dtype == np.float32 and np.array_equal(a, x8.astype(np.float32))
    np.savez(tmp_path / "q.npz", x=x8.astype(np.float64))
    assert open_array(tmp_path / "q.npz", "x", tmp_path / "cache", float32=True).dtype == np.float32
    with pytest.raises(KeyError):
        open_array(tmp_path / "p.npy", "y", tmp_path / "cache")


def test_training_on_memory_mapped_data_matches_in_memory(tmp_path):
    from device_firmware_py.runtime.small_model import SmallModel

    rng = np.random.default_rng(2)
    x, y = rng.random((70, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 70)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    xm = open_array(tmp_path / "d.npz", "x", tmp_path / "cache", float32=True)
    steps: list[tuple[int, int]] = []
    m1, m2 = SmallModel("cnn_small_8x8x1", num_threads=1), SmallModel("cnn_small_8x8x1", num_threads=1)
    l1 = m1.train(x, y, epochs=2, seed=3)
    l2 = m2.train(xm, y, epochs=2, seed=3, on_step=lambda s, t, loss: steps.append((s, t)))
    assert l1 == l2 and all(
        np.array_equal(a, b) for a, b in zip(m1.get_weights(), m2.get_weights(), strict=True)
    )
    assert steps == [(i, 6) for i in range(1, 7)]  # 70 rows, batch 32: 3 steps per epoch
    w = m2.release()
    m2.reopen(w)
    assert all(np.array_equal(a, b) for a, b in zip(w, m2.get_weights(), strict=True))
    assert np.array_equal(m1.logits(x), m2.logits(xm))


def test_int8_quantizer_child_gives_the_in_process_model(tmp_path):
    from device_firmware_py.runtime.small_model import SmallModel

    m = SmallModel("cnn_small_8x8x1", num_threads=1)
    x = np.random.default_rng(4).random((64, 8, 8, 1), dtype=np.float32)
    blob, report = m.quantize_int8_isolated(x, tmp_path, max_samples=64)
    assert blob == m.quantize_int8(x, max_samples=64)
    assert report["bytes"] == len(blob) and report["child_peak_rss_mib"] > 0
    assert not list(tmp_path.glob("int8_*"))  # the exchange files are removed


def _round(arch: str, tmp_path: Path, **kw):
    from bench.device_class import agent_round, private_broker

    with private_broker() as broker:
        return agent_round(arch, broker=broker, workdir=tmp_path / arch, **kw)


def _need_cgroups() -> None:
    from bench.device_class import cgroups_available
    from server_app.transport.broker import find_mosquitto_binary

    if find_mosquitto_binary() is None:
        pytest.skip("mosquitto binary not installed")
    if not cgroups_available():
        pytest.skip("needs root and cgroup v1 memory + cpu controllers")


@pytest.mark.mosquitto
def test_cnn_round_under_192mib_and_a_quarter_core(tmp_path):
    """The demo's proxy size (1,000 images 28x28x1), default plan (1 forward-KD + 5 local epochs),
    int8 re-quantization: all inside 192 MiB and 25 ms of CPU per 100 ms, before the deadline."""
    from bench.device_class import DEADLINE_S, RSS_BUDGET_OVER_NUMPY_MIB, baseline_rss_mib

    _need_cgroups()
    r = _round("cnn_small", tmp_path, proxy=1000, memory_mib=192, cpu_quota=0.25)
    assert r["limited"] and r["cgroup_memory"]["oom_kills"] == 0 and r["agent_exit"] == 0
    assert r["cgroup_cpu"]["nr_throttled"] > 0  # the quota really bit
    assert r["round_s"] < DEADLINE_S and r["logits_shape"] == [1000, 10] and r["int8_bytes"]
    assert r["peak_rss_mib"] - baseline_rss_mib() <= RSS_BUDGET_OVER_NUMPY_MIB, r
    p = r["progress"]
    assert {"start", "train", "uploaded", "quantize", "done"} <= set(p["phases"])
    assert all(
        total == 95 and 0 < step <= total for step, total in p["train_steps_reported"]
    )  # 600 rows x 5 / 32
    assert p["max_per_s"] <= 4  # one step message per second at most, besides the round's 4 milestones


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.parametrize("arch", ["mlp_tiny", "mobilenet_tiny", "mobilenet_micro"])
def test_other_archs_under_192mib_and_a_quarter_core(tmp_path, arch):
    from bench.device_class import DEADLINE_S

    _need_cgroups()
    r = _round(arch, tmp_path, proxy=1000, memory_mib=192, cpu_quota=0.25)
    assert r["cgroup_memory"]["oom_kills"] == 0 and r["agent_exit"] == 0 and r["round_s"] < DEADLINE_S
    assert "done" in r["progress"]["phases"] and r["int8_bytes"]
