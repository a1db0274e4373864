"""Reverse knowledge distillation: the large torch model learns the proxy soft labels.

Loss = T^2 * KL(q || softmax(student / T)) (Hinton: T^2 keeps gradient scale independent of T),
Adam re-created per call (as in the related code), optional parameter anchor
lambda * sum_tensors ||theta - theta_ref||_2 (the code's regularizer: sum of per-tensor L2 norms,
not squared) so the large model does not drift far from a reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from server_app.models.large import model_device


def kd_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(logp, soft_targets, reduction="batchmean") * temperature**2


def reverse_distill(
    large: nn.Module,
    proxy_x: np.ndarray,
    soft_targets: np.ndarray,
    T: float = 1.0,
    epochs: int = 1,
    lr: float = 1e-3,
    batch: int = 256,
    anchor: list[torch.Tensor] | None = None,
    anchor_lambda: float = 0.0,
    seed: int = 0,
) -> float:
    """Train `large` in place on (proxy_x, soft_targets [P, C] probabilities). Returns mean loss.

    Runs where `large` lives (CPU or a GPU): the proxy set and targets are moved there once (a 5k
    28x28 proxy is 16 MB), so a GPU is not starved by per-batch host copies."""
    dev = model_device(large)
    x = torch.from_numpy(np.ascontiguousarray(proxy_x, np.float32)).to(dev)
    q = torch.from_numpy(np.ascontiguousarray(soft_targets, np.float32)).to(dev)
    if len(x) != len(q):
        raise ValueError(f"{len(x)} proxy inputs but {len(q)} soft targets")
    opt = torch.optim.Adam(large.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ref = [a.detach().clone() for a in anchor] if anchor is not None and anchor_lambda > 0 else None
    large.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen).to(dev)  # CPU generator: same order on any device
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = kd_loss(large(x[idx]), q[idx], T)
            if ref is not None:
                loss = loss + anchor_lambda * sum(torch.linalg.vector_norm(p - r) for p, r in zip(large.parameters(), ref, strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    large.eval()
    values = [float(v) for v in losses]  # one device sync at the end, not one per batch
    return float(np.mean(values)) if values else float("nan")
