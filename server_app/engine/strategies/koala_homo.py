"""KOALA homogeneous mode: one small architecture on every device.

Default = the paper's path: FedAvg of the small weights (sample-weighted), the averaged model's
proxy logits distil into the large model. `variant="logits"`: devices upload proxy logits
instead and the server fuses them (ensemble distillation, `fusion` rule)."""

from __future__ import annotations

from typing import Any

from server_app.engine.strategies.koala import KoalaStrategy


class KoalaHomo(KoalaStrategy):
    name = "koala_homo"
    mode = "homo"

    def __init__(self, *args: Any, variant: str = "paper", **kw: Any):
        if variant not in ("paper", "logits"):
            raise ValueError("variant must be 'paper' or 'logits'")
        kw.setdefault("teacher", "avg_model" if variant == "paper" else "device_logits")
        super().__init__(*args, **kw)
        self.variant = variant
