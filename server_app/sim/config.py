"""Experiment configuration: a file (JSON / TOML / YAML) and/or CLI flags -> SimConfig.

A method is a named preset (see PRESETS) or a dict {"name", "strategy", "options"} so ablations
(T=3, more KD epochs, another fusion rule...) are just more entries in `methods`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# name -> (strategy, options, which archs: "homo" | "hetero")
PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "fedavg_large": ("fedavg_large", {}, "homo"),
    "fedavg_small": ("fedavg_small", {}, "homo"),
    "local_only": ("local_only", {}, "homo"),
    "koala_homo": ("koala_homo", {"variant": "paper"}, "homo"),
    "koala_homo_logits": ("koala_homo", {"variant": "logits", "fusion": "weighted"}, "homo"),
    "koala_homo_logits_ca": ("koala_homo", {"variant": "logits", "fusion": "class_aware"}, "homo"),
    "koala_hetero": ("koala_hetero", {"variant": "fused", "fusion": "class_aware"}, "hetero"),
    "koala_hetero_mean": ("koala_hetero", {"variant": "fused", "fusion": "mean"}, "hetero"),
    "koala_hetero_entropy": ("koala_hetero", {"variant": "fused", "fusion": "entropy"}, "hetero"),
    "koala_hetero_group": ("koala_hetero", {"variant": "per_group"}, "hetero"),
}


@dataclass
class MethodSpec:
    name: str
    strategy: str
    options: dict[str, Any] = field(default_factory=dict)
    archs: str = "homo"  # "homo": every device runs `homo_arch`; "hetero": round-robin `hetero_archs`

    @classmethod
    def parse(cls, item: str | dict[str, Any]) -> MethodSpec:
        if isinstance(item, str):
            if item not in PRESETS:
                raise ValueError(f"unknown method {item!r}; presets: {sorted(PRESETS)}")
            s, o, a = PRESETS[item]
            return cls(item, s, dict(o), a)
        base = PRESETS.get(item.get("preset", item.get("strategy", "")))
        strategy = item.get("strategy") or (base[0] if base else None)
        if strategy is None:
            raise ValueError(f"method {item} needs a preset or a strategy")
        options = {**(base[1] if base else {}), **item.get("options", {})}
        archs = item.get("archs", base[2] if base else "homo")
        return cls(item["name"], strategy, options, archs)


@dataclass
class SimConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    devices: int = 10
    alpha: float | None = 0.5  # None = IID
    proxy_size: int = 300
    train_size: int | None = None  # cap on device training samples (all the rest if None)
    min_samples: int = 10
    rounds: int = 3
    methods: list[Any] = field(default_factory=lambda: ["koala_homo"])
    homo_arch: str = "cnn_small"
    hetero_archs: list[str] = field(default_factory=lambda: ["mlp_tiny", "cnn_small", "mobilenet_tiny"])
    seed: int = 0
    temperature: float = 1.0
    local_epochs: int = 1
    lr: float = 1e-3
    rkd_epochs: int = 1
    fkd_epochs: int = 1
    rkd_batch: int = 256
    proxy_per_round: int | None = None  # KOALA: proxy inputs used per round (None: all)
    large: dict[str, Any] = field(default_factory=dict)  # LargeCNN kwargs (width, convs, fc)
    eval_samples: int | None = None  # per-round test subset (final round: full test set)
    small_eval_samples: int = 1000
    torch_threads: int = 2
    device: str = "cpu"  # torch device of the large model: cpu | cuda | cuda:N | auto
    out: str = "sim_out"

    def method_specs(self) -> list[MethodSpec]:
        return [MethodSpec.parse(m) for m in self.methods]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(path: str | Path | None = None, **overrides: Any) -> SimConfig:
    """Read JSON / TOML / YAML (by suffix), then apply non-None overrides (CLI flags)."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        text = p.read_text()
        if p.suffix == ".json":
            data = json.loads(text)
        elif p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"config must be .json, .toml or .yaml, got {p.name}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(data) - set(SimConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    return SimConfig(**data)
