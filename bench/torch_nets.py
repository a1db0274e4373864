"""PyTorch twins of the LiteRT small models, built from the artifact manifest's layer list.

Why: the device-footprint benchmark compares a LiteRT on-device train step with the same network
trained by PyTorch on the same CPU. Building from the manifest (not by hand) keeps the twins
honest; `param_count` is checked against the manifest's so a drifted twin fails loudly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NHWC(nn.Module):
    """Data and LiteRT models are NHWC; torch convolutions want NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class FlattenNHWC(nn.Module):
    """Flatten in HWC order like the TF graph (only the order differs; cost is the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def build_twin(manifest: dict[str, Any]) -> nn.Module:
    h, w, c = manifest["input_shape"]
    layers: list[nn.Module] = [NHWC()]
    ch, flat = c, None
    for kind, out in manifest["layers"]:
        if kind == "conv3":
            layers.append(nn.Conv2d(ch, out, 3, padding=1))
            ch = out
        elif kind == "dw3":
            layers.append(nn.Conv2d(ch, ch, 3, padding=1, groups=ch))
        elif kind == "pw":
            layers.append(nn.Conv2d(ch, out, 1))
            ch = out
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "pool2":
            layers.append(nn.AvgPool2d(2))
            h, w = h // 2, w // 2
        elif kind == "gap":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            flat = ch
        elif kind == "flatten":
            layers.append(FlattenNHWC())
            flat = h * w * ch
        elif kind == "dense":
            assert flat is not None, "dense needs a flat input"
            layers.append(nn.Linear(flat, out))
            flat = out
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
    net = nn.Sequential(*layers)
    n = sum(p.numel() for p in net.parameters())
    if n != manifest["param_count"]:
        raise AssertionError(f"{manifest['name']}: torch twin has {n} params, manifest says {manifest['param_count']}")
    return net


def train_step_fn(net: nn.Module, lr: float = 1e-3) -> Any:
    """One Adam cross-entropy step, the same work as the LiteRT `train` signature."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step
