"""Small-model architectures as plain layer lists, with analytical parameter and FLOP counts.

Pure Python on purpose: `koala zoo list` and the manifests need shapes, parameter counts and
FLOPs without importing TensorFlow. The TF builder (`server_app.zoo.tf_graph`) walks the same
lists, so the numbers reported and the graph exported can not drift apart.

Layer kinds (all stride 1, 'SAME' padding; downsampling is done by 2x2 average pooling because
its backward pass is trivially expressible with LiteRT builtin ops):
  conv3 c   3x3 convolution to c channels (+ bias)
  dw3       3x3 depthwise convolution, multiplier 1 (+ bias)
  pw c      1x1 (pointwise) convolution to c channels (+ bias), computed as a matmul
  dense c   fully connected to c units (+ bias); input must be flat
  relu, pool2 (2x2 average pool), gap (global average pool), flatten
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRAIN_BATCH = 32
# Per-architecture training batch where 32 does not fit a Pi-class memory budget: each training
# signature keeps an activation arena sized by its batch, and mobilenet_tiny's at 32 put the agent
# 79 MiB above bare numpy (issue 17 budget: 64); at 16 it is ~51 MiB (bench/device_class.py).
ARCH_TRAIN_BATCH: dict[str, int] = {"mobilenet_tiny": 16}


def train_batch(arch: str) -> int:
    """The fixed training batch `koala zoo build` exports `arch` with (manifest `train_batch`)."""
    return ARCH_TRAIN_BATCH.get(arch, TRAIN_BATCH)
DEFAULT_NUM_CLASSES = 10
# Inputs built by `koala zoo build` without --input: MNIST-like, CIFAR-like, sklearn digits.
DEFAULT_INPUTS: tuple[tuple[int, int, int], ...] = ((28, 28, 1), (32, 32, 3), (8, 8, 1))
FLOPS_METHOD = (
    "analytical: 2*MACs of conv3/dw3/pw/dense layers per sample (bias adds, activations, pooling, "
    "loss and optimizer excluded). train = forward + weight-gradient (same MACs as forward per "
    "layer) + input-gradient (same MACs as forward, for every parameter layer except the first)."
)


@dataclass(frozen=True)
class Layer:
    kind: str
    out: int = 0


@dataclass(frozen=True)
class WeightInfo:
    name: str  # w000, w001, ... (signature tensor names)
    layer: str  # e.g. "conv3_0/kernel"
    shape: tuple[int, ...]


@dataclass
class ArchPlan:
    """An architecture resolved for one input shape: weights, FLOPs, layer shapes."""

    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    layers: list[Layer]
    weights: list[WeightInfo] = field(default_factory=list)
    forward_flops: int = 0
    train_flops: int = 0

    @property
    def param_count(self) -> int:
        total = 0
        for w in self.weights:
            n = 1
            for d in w.shape:
                n *= d
            total += n
        return total


def _mlp_tiny(h: int, w: int, c: int, k: int) -> list[Layer]:
    # A plain 64-unit MLP on 32x32x3 would be ~197k params; pool 2x2 first for big inputs so the
    # smallest-FLOP architecture stays inside the ~60k-parameter device budget.
    pre = [Layer("pool2")] if h * w * c > 1024 else []
    return pre + [Layer("flatten"), Layer("dense", 64), Layer("relu"), Layer("dense", k)]


def _cnn_small(h: int, w: int, c: int, k: int) -> list[Layer]:
    return [
        Layer("conv3", 8), Layer("relu"), Layer("pool2"),
        Layer("conv3", 16), Layer("relu"), Layer("pool2"),
        Layer("flatten"), Layer("dense", k),
    ]  # fmt: skip


def _mobilenet_tiny(h: int, w: int, c: int, k: int) -> list[Layer]:
    def block(cout: int) -> list[Layer]:
        return [Layer("dw3"), Layer("relu"), Layer("pw", cout), Layer("relu")]

    return (
        [Layer("conv3", 16), Layer("relu")]
        + block(32) + [Layer("pool2")]
        + block(64) + [Layer("pool2")]
        + block(128)
        + [Layer("gap"), Layer("dense", k)]
    )  # fmt: skip


def _mobilenet_micro(h: int, w: int, c: int, k: int) -> list[Layer]:
    # mobilenet_tiny with MobileNet's stride-2 stem (pool right after the first conv), two 32-channel
    # blocks and cnn_small's flatten -> dense head: 1.7 instead of 8.9 MFLOPs per training sample on
    # 28x28x1, so a heterogeneous fleet's mean stays >= 98 % below the large model's (issue 15).
    # A global-average-pool head at this size learnt far less (Fashion-MNIST after 2,000 steps:
    # 0.713 with blocks {32, 64} + GAP, 0.835 with this head; cnn_small 0.837, mobilenet_tiny 0.753)
    def block(cout: int) -> list[Layer]:
        return [Layer("dw3"), Layer("relu"), Layer("pw", cout), Layer("relu")]

    return (
        [Layer("conv3", 16), Layer("relu"), Layer("pool2")]
        + block(32) + [Layer("pool2")]
        + block(32)
        + [Layer("flatten"), Layer("dense", k)]
    )  # fmt: skip


ARCHS = {"mlp_tiny": _mlp_tiny, "cnn_small": _cnn_small, "mobilenet_tiny": _mobilenet_tiny,
         "mobilenet_micro": _mobilenet_micro}  # fmt: skip
ARCH_HELP = {
    "mlp_tiny": "[avgpool2 if H*W*C>1024] -> flatten -> dense 64 -> relu -> dense K",
    "cnn_small": "conv3x3*8 -> relu -> avgpool2 -> conv3x3*16 -> relu -> avgpool2 -> dense K",
    "mobilenet_tiny": "conv3x3*16 -> 3 x (dw3x3 -> relu -> pw1x1 {32,64,128} -> relu), avgpool2 "
    "between blocks -> global avgpool -> dense K",
    "mobilenet_micro": "conv3x3*16 -> relu -> avgpool2 -> 2 x (dw3x3 -> relu -> pw1x1 32 -> relu), avgpool2 "
    "between blocks -> flatten -> dense K",
}


def artifact_name(arch: str, input_shape: tuple[int, int, int]) -> str:
    h, w, c = input_shape
    return f"{arch}_{h}x{w}x{c}"


def parse_input(text: str) -> tuple[int, int, int]:
    """'28x28x1' -> (28, 28, 1)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 3 or min(parts) <= 0:
        raise ValueError(f"input shape must look like 28x28x1, got {text!r}")
    return parts[0], parts[1], parts[2]


def plan(arch: str, input_shape: tuple[int, int, int], num_classes: int = DEFAULT_NUM_CLASSES) -> ArchPlan:
    """Resolve `arch` for `input_shape`: weight shapes in signature order and FLOPs per sample."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    h, w, c = input_shape
    layers = ARCHS[arch](h, w, c, num_classes)
    p = ArchPlan(arch, (h, w, c), num_classes, layers)
    shape: tuple[int, ...] = (h, w, c)
    fwd = grad_w = grad_x = 0
    seen_param_layer = False
    counts: dict[str, int] = {}
    for layer in layers:
        macs = 0
        kernel: tuple[int, ...] | None = None
        if layer.kind in ("conv3", "dw3", "pw"):
            hh, ww, cin = shape
            if layer.kind == "conv3":
                kernel, cout = (3, 3, cin, layer.out), layer.out
                macs = hh * ww * 9 * cin * cout
            elif layer.kind == "dw3":
                kernel, cout = (3, 3, cin, 1), cin
                macs = hh * ww * 9 * cin
            else:
                kernel, cout = (cin, layer.out), layer.out
                macs = hh * ww * cin * cout
            shape = (hh, ww, cout)
        elif layer.kind == "dense":
            if len(shape) != 1:
                raise ValueError(f"{arch}: dense needs a flat input, got {shape}")
            kernel = (shape[0], layer.out)
            macs = shape[0] * layer.out
            shape = (layer.out,)
        elif layer.kind == "pool2":
            hh, ww, cc = shape
            if hh % 2 or ww % 2:
                raise ValueError(f"{arch}: pool2 needs even H, W, got {shape} for input {input_shape}")
            shape = (hh // 2, ww // 2, cc)
        elif layer.kind == "gap":
            shape = (shape[2],)
        elif layer.kind == "flatten":
            n = 1
            for d in shape:
                n *= d
            shape = (n,)
        elif layer.kind != "relu":
            raise ValueError(f"unknown layer kind {layer.kind}")
        if kernel is not None:
            i = counts.get(layer.kind, 0)
            counts[layer.kind] = i + 1
            base = f"{layer.kind}_{i}"
            p.weights.append(WeightInfo(f"w{len(p.weights):03d}", f"{base}/kernel", kernel))
            p.weights.append(WeightInfo(f"w{len(p.weights):03d}", f"{base}/bias", (shape[-1],)))
            fwd += 2 * macs
            grad_w += 2 * macs
            if seen_param_layer:
                grad_x += 2 * macs
            seen_param_layer = True
    if shape != (num_classes,):
        raise ValueError(f"{arch}: output shape {shape} != ({num_classes},)")
    p.forward_flops = fwd
    p.train_flops = fwd + grad_w + grad_x
    return p
