"""FLOPs of the torch large model, counted by torch.utils.flop_counter (not estimated by hand):
forward and training (forward + backward) per sample. Convention matches the small-model
manifests: 2 x MACs of conv/matmul; activations, pooling and optimizer excluded."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _count(model: nn.Module, x: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        if backward:
            out.sum().backward()
    model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def flops_per_sample(model: nn.Module, input_shape: tuple[int, int, int], batch: int = 2) -> dict[str, int]:
    """{'forward_flops_per_sample', 'train_flops_per_sample'} for NHWC input_shape."""
    x = torch.zeros((batch, *input_shape), device=next(model.parameters()).device)
    was = model.training
    model.train()
    fwd = _count(model, x, backward=False) // batch
    train = _count(model, x, backward=True) // batch
    model.train(was)
    return {"forward_flops_per_sample": fwd, "train_flops_per_sample": train}


def resource_summary(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    params = int(sum(p.numel() for p in model.parameters()))
    return {"param_count": params, "float_bytes": params * 4, **flops_per_sample(model, input_shape)}
