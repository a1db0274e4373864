"""One file per algorithm. `build_strategy(name, **options)` makes one by name."""

from __future__ import annotations

from typing import Any

from server_app.engine.strategies.fedavg_large import FedAvgLarge
from server_app.engine.strategies.fedavg_small import FedAvgSmall
from server_app.engine.strategies.koala import KoalaConfig, KoalaStrategy
from server_app.engine.strategies.koala_hetero import KoalaHetero
from server_app.engine.strategies.koala_homo import KoalaHomo
from server_app.engine.strategies.local_only import LocalOnly

STRATEGIES = {
    "koala_homo": KoalaHomo,
    "koala_hetero": KoalaHetero,
    "fedavg_large": FedAvgLarge,
    "fedavg_small": FedAvgSmall,
    "local_only": LocalOnly,
}


def build_strategy(name: str, **options: Any):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name](**options)


__all__ = ["STRATEGIES", "FedAvgLarge", "FedAvgSmall", "KoalaConfig", "KoalaHetero", "KoalaHomo",
           "KoalaStrategy", "LocalOnly", "build_strategy"]  # fmt: skip
