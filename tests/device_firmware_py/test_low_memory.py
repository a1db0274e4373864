"""SmallModel(low_memory=True): one training phase's interpreter at a time, bit-identical numbers.

The low-memory model closes its LiteRT interpreter after forward KD and after local training (each
signature's batch-32 activation arena goes with it) and carries the weights AND the Adam state to
the next interpreter through the get_state/set_state signatures added in memory
(runtime/state_signatures.py). A round must give exactly the same weights and logits as one
long-lived interpreter, round after round (the Adam moments carry across phases and rounds).
"""

from __future__ import annotations

import numpy as np
import pytest

from device_firmware_py.contract.messages import Assignment
from device_firmware_py.contract.plan import TrainingPlan
from device_firmware_py.runtime.manifest import artifact_path
from device_firmware_py.runtime.small_model import SmallModel
from device_firmware_py.runtime.state_signatures import with_state_signatures
from device_firmware_py.task import execute_assignment

ARCHS = ["mlp_tiny", "cnn_small", "mobilenet_tiny"]
SHAPE = (28, 28, 1)


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, 80).astype(np.int64)
    x = (rng.random((80, *SHAPE), dtype=np.float32) * 0.5 + y[:, None, None, None] / 20).astype(np.float32)
    proxy = rng.random((70, *SHAPE), dtype=np.float32)
    teacher = rng.normal(size=(70, 10)).astype(np.float32)
    return x, y, proxy, teacher


def _round(model: SmallModel, x, y, proxy, teacher, round_id: int):
    plan = TrainingPlan(upload=("logits", "weights"), local_epochs=2, fkd_epochs=1, post_fkd_epochs=1,
                        temperature=2.0, seed=round_id)  # fmt: skip
    a = Assignment(round_id, "dev000", model.manifest.arch, plan=plan, teacher_logits=teacher)
    return execute_assignment(model, x, y, proxy, a)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_signatures_cover_weights_and_adam(arch):
    path = artifact_path(arch, SHAPE)
    blob, shapes = with_state_signatures(path.read_bytes())
    m = SmallModel(path)
    for name, shape in zip(m.manifest.weight_names, m.manifest.weight_shapes, strict=True):
        assert shapes[name] == tuple(shape)
        assert shapes[f"m_{name[1:]}"] == tuple(shape) and shapes[f"v_{name[1:]}"] == tuple(shape)
    assert shapes["adam_b1t"] == () and shapes["adam_b2t"] == ()
    assert len(shapes) == 3 * len(m.manifest.weight_names) + 2
    assert len(blob) > path.stat().st_size


@pytest.mark.parametrize("arch", ARCHS)
def test_low_memory_round_is_bit_identical(arch, tmp_path):
    """Same seed, same data: the low-memory model's weights and uploaded logits equal the
    long-lived interpreter's exactly, over two rounds (Adam state carried across phases and rounds)."""
    x, y, proxy, teacher = _data()
    ref = SmallModel(artifact_path(arch, SHAPE), num_threads=1)
    low = SmallModel(artifact_path(arch, SHAPE), num_threads=1, low_memory=True, cache_dir=tmp_path)
    assert low.low_memory and not ref.low_memory
    for r in (0, 1):
        a, b = _round(ref, x, y, proxy, teacher, r), _round(low, x, y, proxy, teacher, r)
        for wa, wb in zip(a.weights, b.weights, strict=True):
            np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(a.proxy_logits, b.proxy_logits)
        assert a.metrics["distill_loss"] == b.metrics["distill_loss"]
        assert a.metrics["train_loss"] == b.metrics["train_loss"]
    # The Adam state did carry: a model whose moments restart (release/reopen) ends elsewhere.
    fresh = SmallModel(artifact_path(arch, SHAPE), num_threads=1)
    _round(fresh, x, y, proxy, teacher, 0)
    fresh.reopen(fresh.release())
    c = _round(fresh, x, y, proxy, teacher, 1)
    assert any(not np.array_equal(wa, wc) for wa, wc in zip(a.weights, c.weights, strict=True))


def test_low_memory_parks_between_phases(tmp_path):
    x, y, proxy, teacher = _data(1)
    m = SmallModel(artifact_path("cnn_small", SHAPE), num_threads=1, low_memory=True, cache_dir=tmp_path)
    m.park()
    assert m.parked
    w0 = m.get_weights()  # from the parked state, no interpreter
    assert m.parked
    m.distill(proxy, teacher, epochs=1)
    assert m.parked  # a training phase closes its interpreter
    m.logits(proxy[:10])
    assert not m.parked  # inference keeps it (small arena)
    m.train(x, y, epochs=1)  # another heavy signature: parked first, then closed again
    assert m.parked
    # set_weights resets Adam exactly as on a long-lived interpreter
    ref = SmallModel(artifact_path("cnn_small", SHAPE), num_threads=1)
    m.set_weights(w0)
    ref.set_weights(w0)
    m.train(x, y, epochs=1, seed=3)
    ref.train(x, y, epochs=1, seed=3)
    for wa, wb in zip(m.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    # save/load state round-trips while parked
    m.save_state(tmp_path / "model.npz")
    n = SmallModel(artifact_path("cnn_small", SHAPE), num_threads=1, low_memory=True, cache_dir=tmp_path)
    n.load_state(tmp_path / "model.npz")
    for wa, wb in zip(m.get_weights(), n.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    # the state model was made once, in the cache
    assert len(list(tmp_path.glob("cnn_small_28x28x1-*.state*.tflite"))) == 1
