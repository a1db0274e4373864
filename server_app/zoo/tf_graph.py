"""TensorFlow graphs of the small models, written so that LiteRT can TRAIN them with builtin ops only.

Standard TF gradients lower to Flex ops (ReluGrad, Conv2DBackpropFilter, AvgPoolGrad, BiasAddGrad)
that plain LiteRT can not run, so every layer whose default gradient is not builtin-convertible
gets a `tf.custom_gradient` (design notes §6):
  conv3   forward CONV_2D; dx = conv with the kernel rotated 180° and in/out swapped;
          dW = 9 `tf.slice` taps of the padded input, concatenated, one matmul with dy
  dw3     forward DEPTHWISE_CONV_2D; dx = depthwise conv with the rotated kernel;
          dW = per-tap sum(slice * dy)
  relu    dy * (x > 0)
  pool2   forward AVERAGE_POOL_2D; dx = nearest-neighbour 2x upsampling of dy / 4
  gap     forward MEAN; dx = dy broadcast / (H*W)
  bias    db = sum(dy) (avoids BiasAddGrad / BroadcastGradientArgs)
pw and dense are reshape + matmul, whose standard gradients are matmuls. Losses use a hand-written
log-softmax; the optimizer is a hand-written Adam on tf.Variables (no tf.train/keras optimizers).

Import only from the builder: this module imports TensorFlow at import time.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from server_app.zoo.archs import ArchPlan

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-7


def _static(x: tf.Tensor) -> list[int]:
    return [int(d) for d in x.shape[1:]]


def relu(x: tf.Tensor) -> tf.Tensor:
    @tf.custom_gradient
    def f(x):
        def grad(dy):
            return dy * tf.cast(x > 0.0, tf.float32)

        return tf.maximum(x, 0.0), grad

    return f(x)


def add_bias(x: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    rank = len(x.shape)

    @tf.custom_gradient
    def f(x, b):
        def grad(dy):
            return dy, tf.reduce_sum(dy, axis=list(range(rank - 1)))

        return x + b, grad

    return f(x, b)


def conv3(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    h, wd, c = _static(x)
    cout = int(w.shape[3])

    @tf.custom_gradient
    def f(x, w):
        def grad(dy):
            w_rot = tf.transpose(tf.reverse(w, axis=[0, 1]), [0, 1, 3, 2])
            dx = tf.nn.conv2d(dy, w_rot, strides=1, padding="SAME")
            xp = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
            taps = [tf.slice(xp, [0, a, b, 0], [-1, h, wd, c]) for a in range(3) for b in range(3)]
            patches = tf.reshape(tf.concat(taps, axis=3), [-1, 9 * c])
            dw = tf.matmul(patches, tf.reshape(dy, [-1, cout]), transpose_a=True)
            return dx, tf.reshape(dw, [3, 3, c, cout])

        return tf.nn.conv2d(x, w, strides=1, padding="SAME"), grad

    return f(x, w)


def dw3(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    h, wd, c = _static(x)

    @tf.custom_gradient
    def f(x, w):
        def grad(dy):
            dx = tf.nn.depthwise_conv2d(dy, tf.reverse(w, axis=[0, 1]), [1, 1, 1, 1], "SAME")
            xp = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
            taps = [
                tf.reduce_sum(tf.slice(xp, [0, a, b, 0], [-1, h, wd, c]) * dy, axis=[0, 1, 2])
                for a in range(3)
                for b in range(3)
            ]
            return dx, tf.reshape(tf.stack(taps), [3, 3, c, 1])

        return tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME"), grad

    return f(x, w)


def pool2(x: tf.Tensor) -> tf.Tensor:
    h, wd, _ = _static(x)

    @tf.custom_gradient
    def f(x):
        def grad(dy):
            up = tf.compat.v1.image.resize_nearest_neighbor(
                dy, [h, wd], align_corners=False, half_pixel_centers=False
            )
            return up * 0.25

        return tf.nn.avg_pool2d(x, 2, 2, "VALID"), grad

    return f(x)


def gap(x: tf.Tensor) -> tf.Tensor:
    h, wd, c = _static(x)

    @tf.custom_gradient
    def f(x):
        def grad(dy):
            return tf.reshape(dy, [-1, 1, 1, c]) * tf.ones([1, h, wd, c]) / float(h * wd)

        return tf.reduce_mean(x, axis=[1, 2]), grad

    return f(x)


def forward(plan: ArchPlan, x: tf.Tensor, weights: list) -> tf.Tensor:
    """Logits of `plan` for x[N,H,W,C]; `weights` in manifest order (kernel, bias per layer)."""
    it = iter(weights)
    for layer in plan.layers:
        k = layer.kind
        if k == "conv3":
            x = add_bias(conv3(x, next(it)), next(it))
        elif k == "dw3":
            x = add_bias(dw3(x, next(it)), next(it))
        elif k == "pw":
            h, wd, c = _static(x)
            kern = next(it)
            y = tf.matmul(tf.reshape(x, [-1, c]), kern)
            x = tf.reshape(add_bias(y, next(it)), [-1, h, wd, int(kern.shape[1])])
        elif k == "dense":
            x = add_bias(tf.matmul(x, next(it)), next(it))
        elif k == "relu":
            x = relu(x)
        elif k == "pool2":
            x = pool2(x)
        elif k == "gap":
            x = gap(x)
        elif k == "flatten":
            x = tf.reshape(x, [-1, int(np.prod(_static(x)))])
        else:  # pragma: no cover - archs.plan validates kinds
            raise ValueError(k)
    return x


def log_softmax(z: tf.Tensor) -> tf.Tensor:
    s = z - tf.stop_gradient(tf.reduce_max(z, axis=-1, keepdims=True))
    return s - tf.math.log(tf.reduce_sum(tf.exp(s), axis=-1, keepdims=True))


class TrainableModel(tf.Module):
    """Variables + the five signatures (train, distill, logits, get_weights, set_weights)."""

    def __init__(self, plan: ArchPlan, init: list[np.ndarray], batch: int):
        super().__init__(name=plan.arch)
        self.plan = plan
        self.w = [tf.Variable(v, name=info.name) for v, info in zip(init, plan.weights, strict=True)]
        self.m = [tf.Variable(np.zeros_like(v), name=f"m_{i:03d}") for i, v in enumerate(init)]
        self.v = [tf.Variable(np.zeros_like(v), name=f"v_{i:03d}") for i, v in enumerate(init)]
        self.b1t = tf.Variable(1.0, name="adam_b1t")
        self.b2t = tf.Variable(1.0, name="adam_b2t")
        h, w, c = plan.input_shape
        k = plan.num_classes
        f32, i32 = tf.float32, tf.int32
        xb = tf.TensorSpec([batch, h, w, c], f32, name="x")
        lr = tf.TensorSpec([], f32, name="lr")
        self.train = tf.function(
            self._train, input_signature=[xb, tf.TensorSpec([batch], i32, name="y"), lr]
        )
        self.distill = tf.function(
            self._distill,
            input_signature=[
                xb, tf.TensorSpec([batch, k], f32, name="teacher"),
                tf.TensorSpec([], f32, name="temperature"), lr,
            ],
        )  # fmt: skip
        self.logits = tf.function(self._logits, input_signature=[tf.TensorSpec([None, h, w, c], f32, name="x")])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(
            self._set_weights,
            input_signature=[tf.TensorSpec(i.shape, f32, name=i.name) for i in plan.weights],
        )

    def signatures(self) -> dict:
        return {
            "train": self.train.get_concrete_function(),
            "distill": self.distill.get_concrete_function(),
            "logits": self.logits.get_concrete_function(),
            "get_weights": self.get_weights.get_concrete_function(),
            "set_weights": self.set_weights.get_concrete_function(),
        }

    def _adam(self, loss_fn, lr):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, self.w)
        b1t = self.b1t.assign(self.b1t * ADAM_B1)
        b2t = self.b2t.assign(self.b2t * ADAM_B2)
        for w, m, v, g in zip(self.w, self.m, self.v, grads, strict=True):
            m_new = m.assign(ADAM_B1 * m + (1.0 - ADAM_B1) * g)
            v_new = v.assign(ADAM_B2 * v + (1.0 - ADAM_B2) * g * g)
            step = (m_new / (1.0 - b1t)) / (tf.sqrt(v_new / (1.0 - b2t)) + ADAM_EPS)
            w.assign_sub(lr * step)
        return loss

    def _train(self, x, y, lr):
        def loss_fn():
            logp = log_softmax(forward(self.plan, x, self.w))
            onehot = tf.one_hot(y, self.plan.num_classes, dtype=tf.float32)
            return -tf.reduce_mean(tf.reduce_sum(onehot * logp, axis=-1))

        return {"loss": self._adam(loss_fn, lr)}

    def _distill(self, x, teacher, temperature, lr):
        def loss_fn():
            log_q = log_softmax(forward(self.plan, x, self.w) / temperature)
            log_p = log_softmax(teacher / temperature)
            kl = tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)
            return tf.reduce_mean(kl) * temperature * temperature

        return {"loss": self._adam(loss_fn, lr)}

    def _logits(self, x):
        return {"logits": forward(self.plan, x, self.w)}

    def _get_weights(self):
        return {info.name: tf.identity(w) for info, w in zip(self.plan.weights, self.w, strict=True)}

    def _set_weights(self, *values):
        for w, m, v, val in zip(self.w, self.m, self.v, values, strict=True):
            w.assign(val)
            m.assign(tf.zeros_like(val))
            v.assign(tf.zeros_like(val))
        self.b1t.assign(1.0)
        self.b2t.assign(1.0)
        # A signature without outputs is untested in LiteRT: return a real (data-dependent) flag.
        return {"ok": tf.cast(tf.reduce_all(tf.math.is_finite(values[0])), tf.int32)}


class InferenceModel(tf.Module):
    """Logits only, weights as constants: the float model the device patches and int8-quantizes."""

    def __init__(self, plan: ArchPlan, weights: list[np.ndarray]):
        super().__init__(name=f"{plan.arch}_infer")
        self.plan = plan
        self._consts = [np.asarray(w, np.float32) for w in weights]
        h, w, c = plan.input_shape
        self.logits = tf.function(self._logits, input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name="x")])

    def _logits(self, x):
        return {"logits": forward(self.plan, x, [tf.constant(w) for w in self._consts])}
