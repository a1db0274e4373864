"""SmallModel on real data (sklearn digits, 8x8): every architecture learns, distils, round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from device_firmware_py.runtime.manifest import artifact_path
from device_firmware_py.runtime.quantize import TFLiteLogits, int8_report
from device_firmware_py.runtime.small_model import SmallModel

ARCHS = ["mlp_tiny", "cnn_small", "mobilenet_tiny", "mobilenet_micro"]


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    return x[:1300], y[:1300], x[1300:], y[1300:]


@pytest.fixture(scope="module", params=ARCHS)
def trained(request, digits):
    """One model per arch trained 8 epochs on digits (shared by the tests below)."""
    xtr, ytr, _, _ = digits
    m = SmallModel(artifact_path(request.param, (8, 8, 1)))
    loss = m.train(xtr, ytr, epochs=8, lr=3e-3, seed=0)
    return m, loss


def _kl(teacher: np.ndarray, student: np.ndarray) -> float:
    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_softmax(teacher), log_softmax(student)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def test_learns_digits(trained, digits):
    m, loss = trained
    _, _, xte, yte = digits
    assert np.isfinite(loss)
    acc = m.evaluate(xte, yte)
    assert acc > 0.7, f"{m.manifest.name}: test accuracy {acc:.3f}"


def test_weights_round_trip_exactly(trained):
    m, _ = trained
    w = m.get_weights()
    assert [a.shape for a in w] == m.manifest.weight_shapes
    fresh = SmallModel(m.path)
    fresh.set_weights(w)
    for a, b in zip(w, fresh.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_state_survives_save_and_restore(trained, digits, tmp_path):
    m, _ = trained
    _, _, xte, _ = digits
    path = tmp_path / "state.npz"
    m.save_state(path)
    assert not list(tmp_path.glob("*.tmp"))
    fresh = SmallModel(m.path)
    fresh.load_state(path)
    np.testing.assert_array_equal(fresh.logits(xte), m.logits(xte))


def test_distill_lowers_kl_to_teacher(trained, digits):
    teacher, _ = trained
    xtr, _, _, _ = digits
    t_logits = teacher.logits(xtr)
    student = SmallModel(teacher.path)  # fresh initial weights
    before = _kl(t_logits, student.logits(xtr))
    loss = student.distill(xtr, t_logits, temperature=2.0, epochs=4, lr=3e-3)
    after = _kl(t_logits, student.logits(xtr))
    assert np.isfinite(loss)
    assert after < 0.5 * before, (before, after)


def test_float_inference_model_matches_training_model(trained, digits):
    m, _ = trained
    _, _, xte, _ = digits
    inf = TFLiteLogits(m.float_inference_model())
    np.testing.assert_allclose(inf(xte), m.logits(xte), atol=1e-4, rtol=1e-4)


def test_int8_model_close_to_float(trained, digits):
    m, _ = trained
    xtr, _, xte, yte = digits
    r, q = int8_report(m, xtr, xte, yte, max_samples=256)
    assert r.int8_model_bytes == len(q) < r.float_model_bytes
    assert r.calibration_samples == 256
    assert r.argmax_agreement > 0.85 and r.int8_accuracy > r.float_accuracy - 0.06, r
    # the int8 model is a real full-integer model: int8 input and output tensors
    int8 = TFLiteLogits(q)
    assert int8._in_dtype == np.int8 and int8._out_q is not None


def test_train_rejects_bad_shapes(trained):
    m, _ = trained
    with pytest.raises(ValueError):
        m.train(np.zeros((4, 9, 9, 1), np.float32), np.zeros(4))
    with pytest.raises(ValueError):
        m.set_weights(m.get_weights()[:-1])


def test_small_dataset_wraps_to_one_full_batch():
    """Fewer samples than the fixed batch: the batch wraps around instead of failing."""
    m = SmallModel(artifact_path("mlp_tiny", (8, 8, 1)))
    x = np.random.default_rng(0).uniform(size=(5, 8, 8, 1)).astype(np.float32)
    loss = m.train(x, np.arange(5), epochs=1)
    assert np.isfinite(loss)
    assert m.logits(x).shape == (5, 10)


def test_logits_independent_of_chunking_after_training(trained, digits):
    """Growing the logits batch re-allocates tensors; trained variables must survive it."""
    m, _ = trained
    _, _, xte, _ = digits
    fresh = SmallModel(m.path)
    fresh.set_weights(m.get_weights())
    small = fresh.logits(xte[:3])
    full = fresh.logits(xte, batch=128)
    np.testing.assert_array_equal(small, full[:3])
    np.testing.assert_allclose(full, m.logits(xte), rtol=1e-5, atol=1e-5)
