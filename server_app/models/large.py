"""VGG-style large model (the paper's student is VGG19): 3 stages of 3x3 conv + ReLU, max-pool
between stages, then two hidden FC layers. Works for 28x28x1, 32x32x3 and 8x8x1 inputs
(NHWC numpy in, permuted to NCHW inside). `width` scales every layer.

Default (width=32, convs=(3,3,3), fc=1024) on 28x28x1: ~2.7M params, ~106 MFLOPs forward per
sample: >=30x the biggest small model (mlp_tiny 51k params; mobilenet_tiny 3.0 MFLOPs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class LargeCNN(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int = 10,
        width: int = 32,
        convs: tuple[int, ...] = (3, 3, 3),
        fc: int = 1024,
    ):
        super().__init__()
        h, w, c = input_shape
        self.input_shape = (h, w, c)
        self.config = {"width": width, "convs": list(convs), "fc": fc, "num_classes": num_classes}
        layers: list[nn.Module] = []
        cin = c
        for stage, n in enumerate(convs):
            cout = width * 2**stage
            for _ in range(n):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * h * w, fc), nn.ReLU(inplace=True),
            nn.Linear(fc, fc), nn.ReLU(inplace=True),
            nn.Linear(fc, num_classes),
        )  # fmt: skip
        self._init()

    def _init(self) -> None:
        """He init (fan_in, ReLU): PyTorch's default init shrinks the signal ~sqrt(3)x per layer,
        and 12 plain layers without normalization then do not train at all (measured: chance)."""
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                if mod.bias is not None:  # every layer here has one
                    nn.init.zeros_(mod.bias)
        last = self.classifier[-1]
        assert isinstance(last, nn.Linear)
        nn.init.normal_(last.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H, W, C] (NHWC like the data and the device models) or [N, C, H, W]."""
        if x.ndim == 4 and x.shape[-1] == self.input_shape[2] and x.shape[1] == self.input_shape[0]:
            x = x.permute(0, 3, 1, 2)
        return self.classifier(self.features(x))


def build_large(input_shape: tuple[int, int, int], num_classes: int = 10, seed: int = 0, **kw) -> LargeCNN:
    """Deterministic construction: the same seed gives the same initial weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LargeCNN(tuple(input_shape), num_classes, **kw)
    finally:
        torch.random.set_rng_state(gen_state)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (cuda when present) -> a torch.device that exists here.

    Why up front: asking for a GPU the machine lacks must fail at start with a clear message, not
    as a CUDA error in the middle of a round's reverse distillation."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(name))
    except RuntimeError as exc:
        raise ValueError(f"unknown torch device {name!r} (use cpu, cuda, cuda:N or auto)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"torch device {name!r} requested but CUDA is not available "
                             f"(torch {torch.__version__}, CPU wheel?)")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"torch device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"torch device {name!r} not supported (use cpu, cuda, cuda:N or auto)")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live: inputs follow the model, not the other way round."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def param_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    model.eval()
    dev = model_device(model)
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch])).to(dev)).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(predict_logits(model, x).argmax(1) == y))


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    # load_state_dict copies into the existing parameters, so a model on the GPU stays there
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})


def build_large_model(spec: Any, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """The policy's large model (`server_app.policy.LargeModelSpec`): the built-in LargeCNN, or a
    user's `module:attr` factory called as factory(input_shape, num_classes, seed=seed, **options)."""
    if spec.factory:
        from server_app.plugins import load_ref

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = load_ref(spec.factory, "large model factory")(tuple(input_shape), num_classes, seed=seed, **spec.options)
        finally:
            torch.random.set_rng_state(gen_state)
        if not isinstance(model, nn.Module):
            raise TypeError(f"large model factory {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    return build_large(tuple(input_shape), num_classes, seed=seed, width=spec.width, **spec.options)  # type: ignore[arg-type]
