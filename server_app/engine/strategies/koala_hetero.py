"""KOALA heterogeneous mode: several small architectures in one fleet.

Default: every device uploads proxy logits; the server fuses them into consensus soft labels
with a pluggable rule (`fusion`: mean | weighted | entropy | class_aware | group) and distils
the large model. `variant="per_group"`: the related code's path — FedAvg per architecture, each
architecture's averaged model distils into its own copy of the large model, then the copies are
averaged (weighted by group sample counts)."""

from __future__ import annotations

from typing import Any

from server_app.engine.strategies.koala import KoalaStrategy


class KoalaHetero(KoalaStrategy):
    name = "koala_hetero"
    mode = "hetero"

    def __init__(self, *args: Any, variant: str = "fused", **kw: Any):
        if variant not in ("fused", "per_group"):
            raise ValueError("variant must be 'fused' or 'per_group'")
        if variant == "per_group":
            kw.setdefault("teacher", "avg_model")
            kw.setdefault("rkd", "per_group")
        else:
            kw.setdefault("teacher", "device_logits")
            kw.setdefault("fusion", "class_aware")
        super().__init__(*args, **kw)
        self.variant = variant
