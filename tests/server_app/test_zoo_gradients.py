"""The hand-written (builtin-convertible) gradients equal TensorFlow's standard autodiff."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = [
    pytest.mark.tensorflow,
    pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow-cpu"),
]


def _reference_forward(tf, plan, x, weights):
    """The same network written with stock TF ops (whose gradients would be Flex ops in LiteRT)."""
    it = iter(weights)
    for layer in plan.layers:
        k = layer.kind
        if k == "conv3":
            x = tf.nn.bias_add(tf.nn.conv2d(x, next(it), 1, "SAME"), next(it))
        elif k == "dw3":
            x = tf.nn.bias_add(tf.nn.depthwise_conv2d(x, next(it), [1, 1, 1, 1], "SAME"), next(it))
        elif k == "pw":
            kern = next(it)
            x = tf.nn.bias_add(tf.nn.conv2d(x, kern[None, None], 1, "SAME"), next(it))
        elif k == "dense":
            x = tf.nn.bias_add(tf.matmul(x, next(it)), next(it))
        elif k == "relu":
            x = tf.nn.relu(x)
        elif k == "pool2":
            x = tf.nn.avg_pool2d(x, 2, 2, "VALID")
        elif k == "gap":
            x = tf.reduce_mean(x, axis=[1, 2])
        elif k == "flatten":
            x = tf.reshape(x, [tf.shape(x)[0], -1])
    return x


@pytest.mark.parametrize("arch", ["mlp_tiny", "cnn_small", "mobilenet_tiny", "mobilenet_micro"])
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_custom_gradients_match_autodiff(arch, shape):
    import tensorflow as tf

    from server_app.zoo import tf_graph
    from server_app.zoo.archs import plan

    p = plan(arch, shape)
    rng = np.random.default_rng(0)
    ws = [tf.Variable(rng.normal(0, 0.3, w.shape).astype(np.float32)) for w in p.weights]
    x = tf.constant(rng.uniform(size=(6, *shape)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, 6))

    def loss(fwd):
        with tf.GradientTape() as tape:
            logits = fwd(x)
            ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return ce, tape.gradient(ce, ws)

    ours_loss, ours = loss(lambda v: tf_graph.forward(p, v, ws))
    ref_loss, ref = loss(lambda v: _reference_forward(tf, p, v, ws))
    np.testing.assert_allclose(ours_loss.numpy(), ref_loss.numpy(), rtol=1e-5)
    for info, a, b in zip(p.weights, ours, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, err_msg=info.layer)
