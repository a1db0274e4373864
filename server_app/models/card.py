"""The model card (`model.json`) written next to every exported large model.

Why a card: a `state_dict` alone is useless to someone who does not have this repository open
(which builder, which width, NHWC or NCHW, which normalisation, which class is index 3?). The card
says all of it, in two ways:

- for torch users: the factory reference (`module:attr`) and its options, called as
  `factory(input_shape, num_classes, seed=seed, **options)` -- the same call the server made
  (server_app.models.large.build_large_model);
- for users without the source (ONNX Runtime, other frameworks): the module tree, layer by layer
  with each layer's hyper-parameters, and every tensor's name, shape and dtype in the safetensors
  file -- enough to rebuild the network by hand.

It also records where the weights came from: the round and model version, the policy, the digests
of the proxy and test sets, and the large model's accuracy after every round so far.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_FORMAT = "koala-model-card/1"
CARD_NAME = "model.json"
BUILTIN_FACTORY = "server_app.models.large:build_large"

# Class names and pixel scaling of the data sets `koala data prepare` writes (server_app.data.datasets).
CLASS_NAMES: dict[str, list[str]] = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "mnist": [str(i) for i in range(10)],
    "digits": [str(i) for i in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}  # fmt: skip
PIXEL_MAX = {"fashion-mnist": 255.0, "mnist": 255.0, "cifar10": 255.0, "digits": 16.0}

# Constructor attributes of the standard layers, recorded so the network can be rebuilt without torch.
_LAYER_ATTRS: dict[str, tuple[str, ...]] = {
    "Conv1d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
    "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
    "Linear": ("in_features", "out_features"),
    "MaxPool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "AvgPool2d": ("kernel_size", "stride", "padding", "ceil_mode"),
    "AdaptiveAvgPool2d": ("output_size",),
    "BatchNorm1d": ("num_features", "eps", "momentum", "affine"),
    "BatchNorm2d": ("num_features", "eps", "momentum", "affine"),
    "LayerNorm": ("normalized_shape", "eps", "elementwise_affine"),
    "Flatten": ("start_dim", "end_dim"),
    "Dropout": ("p",),
    "LeakyReLU": ("negative_slope",),
}


class CardError(ValueError):
    """A model card that is missing, unreadable or not one of ours."""


@dataclass
class ExportContext:
    """What the server knows about its large model beyond the weights: everything the card needs.

    Built once per server (server_app.services) from the policy and the data files, or by
    `koala models export` from a settings file when a checkpoint has no export yet."""

    input_shape: tuple[int, int, int]
    num_classes: int
    factory: str = BUILTIN_FACTORY
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    policy: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # proxy_sha256, test_sha256, proxy_size, ...
    calibration_x: Any = None  # proxy rows for int8 calibration of the small models (numpy) or None
    # the proxy set (numpy): where the strategy keeps no global small model (devices upload logits,
    # the default), the export distils the large model into each architecture on it (export.py)
    proxy_x: Any = None

    @classmethod
    def from_policy(cls, policy: Any, input_shape: tuple[int, ...], num_classes: int, **kw: Any) -> ExportContext:
        """The factory call server_app.models.large.build_large_model makes for `policy.large`."""
        spec = policy.large
        if spec.factory:
            factory, options = spec.factory, dict(spec.options)
        else:
            factory, options = BUILTIN_FACTORY, {"width": spec.width, **spec.options}
        h, w, c = (int(s) for s in input_shape)
        return cls((h, w, c), int(num_classes), factory, options, int(policy.seed),
                   policy.model_dump(mode="json"), **kw)  # fmt: skip

    @property
    def class_names(self) -> list[str]:
        names = CLASS_NAMES.get(self.dataset or "")
        return list(names) if names and len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def normalisation(self) -> dict[str, Any]:
        """How raw pixels become model input (server_app.data.datasets: pixel / max, no mean/std)."""
        top = PIXEL_MAX.get(self.dataset or "")
        if top is None:
            return {"formula": "unknown: the same scaling as the proxy set the server was given", "dataset": self.dataset}
        return {"formula": f"x = pixel / {top:g}", "scale": 1.0 / top, "offset": 0.0, "range": [0.0, 1.0],
                "dataset": self.dataset}  # fmt: skip


def read_dataset_info(proxy_path: str | Path) -> dict[str, Any]:
    """`data.json` that `koala data prepare` writes next to proxy.npz ({} when absent)."""
    p = Path(proxy_path).parent / "data.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def describe_layers(model: Any) -> list[dict[str, Any]]:
    """Leaf modules in registration order (= forward order for Sequential stacks like LargeCNN),
    each with its type and constructor hyper-parameters."""
    out = []
    for name, mod in model.named_modules():
        if any(True for _ in mod.children()):
            continue
        kind = type(mod).__name__
        layer: dict[str, Any] = {"name": name, "type": kind}
        for attr in _LAYER_ATTRS.get(kind, ()):
            v = getattr(mod, attr, None)
            layer[attr] = list(v) if isinstance(v, tuple) else v
        if kind in ("Conv1d", "Conv2d", "Linear"):
            layer["bias"] = getattr(mod, "bias", None) is not None
        extra = mod.extra_repr()
        if extra and len(layer) == 2:  # an unknown layer type: its own description
            layer["repr"] = extra
        out.append(layer)
    return out


def describe_tensors(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()}


def build_card(
    ctx: ExportContext,
    model: Any,
    *,
    version: int,
    round_id: int | None,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    files: dict[str, dict[str, Any]],
    small: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The card of one exported version. `history`: accuracy entries of the earlier versions."""
    import torch

    from server_app.models.large import param_count

    state = model.state_dict()
    entry = {"version": version, "round": round_id, **{k: v for k, v in metrics.items() if "_acc" in k}}
    hist = [h for h in history if h.get("version") != version] + [entry]
    hist.sort(key=lambda h: h.get("version", 0))
    h, w, c = ctx.input_shape
    return {
        "format": CARD_FORMAT,
        "name": "koala-large",
        "version": version,
        "round": round_id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"koala_edge": _koala_version(), "torch": torch.__version__.split("+")[0]},
        "model": {
            "factory": ctx.factory,
            "options": ctx.options,
            "call": "factory(tuple(input.shape), len(output.classes), seed=seed, **options)",
            "seed": ctx.seed,
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "param_count": param_count(model),
            "forward": _forward_note(model),
            "layers": describe_layers(model),
            "tensors": describe_tensors(state),
        },
        "input": {"name": "x", "shape": [h, w, c], "layout": "NHWC", "dtype": "float32",
                  "batch": "any (dimension 0)", "normalisation": ctx.normalisation()},
        "output": {"name": "logits", "shape": ["N", ctx.num_classes], "dtype": "float32",
                   "meaning": "unnormalised logits: softmax for probabilities, argmax for the class",
                   "classes": ctx.class_names},
        "metrics": metrics,
        "accuracy_per_round": hist,
        "policy": ctx.policy,
        "data": {"dataset": ctx.dataset, **ctx.data},
        "files": files,
        "small": small,
    }  # fmt: skip


def _forward_note(model: Any) -> str:
    from server_app.models.large import LargeCNN

    if isinstance(model, LargeCNN):
        return ("x [N,H,W,C] -> permute to [N,C,H,W] -> every `features.*` layer in order -> every `classifier.*` "
                "layer in order (its Flatten flattens in C,H,W order) -> logits [N,K]")
    return ("a user factory's module: `layers` lists its leaf modules in registration order, which need "
            "not be the forward order; ONNX / TorchScript carry the graph itself")


def read_card(path: str | Path) -> dict[str, Any]:
    """A card from a file or an export directory; CardError says what is wrong."""
    p = Path(path)
    if p.is_dir():
        p = p / CARD_NAME
    try:
        card = json.loads(p.read_text())
    except FileNotFoundError:
        raise CardError(f"no model card at {p}") from None
    except (OSError, ValueError) as exc:
        raise CardError(f"model card {p} unreadable: {exc}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise CardError(f"{p} is not a KOALA model card (format {CARD_FORMAT!r})")
    return card


def _koala_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("koala-edge")
    except PackageNotFoundError:
        return "unknown"
