"""`koala sim` configuration: the experiment (data, partition, evaluation) + THE policy.

The policy is `server_app.policy.KoalaPolicy`, the same object `koala serve` and `koala demo`
read, so a policy file means the same thing in simulation and deployment. A file holds
experiment keys at the top level and the policy under `policy` (policy keys at the top level
are accepted too, as a shorthand). Each entry of `methods` is a preset name (see PRESETS) or
{"name", "preset"?, "policy": {overrides}}: ablations are policy overrides of the shared base.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server_app.policy import KoalaPolicy, read_mapping_file

# name -> (policy overrides, which archs: "homo" -> [homo_arch] | "hetero" -> hetero_archs | "policy":
# the policy's own). "policy" runs the base policy as it is (what koala serve would run).
PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "policy": ({}, "policy"),
    "fedavg_large": ({"strategy": "fedavg_large"}, "homo"),
    "fedavg_small": ({"strategy": "fedavg_small"}, "homo"),
    "local_only": ({"strategy": "local_only"}, "homo"),
    "koala_homo": ({"strategy": "koala_homo"}, "homo"),
    "koala_homo_logits": ({"strategy": "koala_homo", "teacher": "device_logits", "fusion": "weighted"}, "homo"),
    "koala_homo_logits_ca": ({"strategy": "koala_homo", "teacher": "device_logits", "fusion": "class_aware"}, "homo"),
    "koala_hetero": ({"strategy": "koala_hetero"}, "hetero"),  # class-aware fusion (policy default)
    "koala_hetero_entropy": ({"strategy": "koala_hetero", "fusion": "entropy"}, "hetero"),
    "koala_hetero_mean": ({"strategy": "koala_hetero", "fusion": "mean"}, "hetero"),
    "koala_hetero_class_aware": ({"strategy": "koala_hetero", "fusion": "class_aware"}, "hetero"),
    "koala_hetero_group": ({"strategy": "koala_hetero", "teacher": "avg_model", "rkd": "per_group"}, "hetero"),
}


@dataclass
class MethodSpec:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # policy fields, strategy included
    archs: str = "homo"  # "homo": every device runs `homo_arch`; "hetero": round-robin `hetero_archs`; "policy"

    @property
    def strategy(self) -> str | None:
        return self.overrides.get("strategy")

    @classmethod
    def parse(cls, item: str | dict[str, Any]) -> MethodSpec:
        if isinstance(item, str):
            if item not in PRESETS:
                raise ValueError(f"unknown method {item!r}; presets: {sorted(PRESETS)}")
            o, a = PRESETS[item]
            return cls(item, dict(o), a)
        if "name" not in item:
            raise ValueError(f"method {item} needs a name")
        extra = set(item) - {"name", "preset", "policy", "archs"}
        if extra:
            raise ValueError(f"method {item['name']!r}: unknown keys {sorted(extra)} (policy changes go under 'policy')")
        base = PRESETS.get(item.get("preset", ""))
        if item.get("preset") and base is None:
            raise ValueError(f"method {item['name']!r}: unknown preset {item['preset']!r}")
        overrides = {**(base[0] if base else {}), **item.get("policy", {})}
        archs = item.get("archs", base[1] if base else ("hetero" if overrides.get("strategy") == "koala_hetero" else "homo"))
        return cls(item["name"], overrides, archs)

    def policy(self, base: KoalaPolicy, homo_arch: str, hetero_archs: list[str]) -> KoalaPolicy:
        if self.archs == "policy":
            return base.with_overrides(**self.overrides)
        archs = [homo_arch] if self.archs == "homo" else list(hetero_archs)
        return base.with_overrides(archs=archs, **self.overrides)


@dataclass
class SimConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    devices: int = 10
    alpha: float | None = 0.5  # None = IID
    proxy_size: int = 300
    labeled_proxy: int = 0  # proxy rows whose labels the server knows (data.prepare.canary_labels)
    train_size: int | None = None  # cap on device training samples (all the rest if None)
    min_samples: int = 10
    methods: list[Any] = field(default_factory=lambda: ["policy"])  # default: the policy as koala serve runs it
    homo_arch: str = "cnn_small"
    hetero_archs: list[str] = field(default_factory=lambda: ["mlp_tiny", "cnn_small", "mobilenet_micro"])
    policy: KoalaPolicy = field(default_factory=KoalaPolicy)
    eval_samples: int | None = None  # test subset scored every round (None: the full test set)
    small_eval_samples: int = 1000
    torch_threads: int = 2
    device: str = "cpu"  # torch device of the large model: cpu | cuda | cuda:N | auto
    out: str = "sim_out"

    @property
    def rounds(self) -> int:
        return self.policy.rounds

    @property
    def seed(self) -> int:
        return self.policy.seed

    def method_specs(self) -> list[MethodSpec]:
        return [MethodSpec.parse(m) for m in self.methods]

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["policy"] = self.policy.model_dump(mode="json")
        return d


def load_config(path: str | Path | None = None, **overrides: Any) -> SimConfig:
    """Read the file, then apply non-None overrides (CLI flags). Policy keys may be given at the
    top level or under `policy`; unknown keys are an error."""
    data: dict[str, Any] = read_mapping_file(path, "experiment file") if path else {}
    policy = dict(data.pop("policy", None) or {})
    policy.update(overrides.pop("policy", None) or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    for k in list(data):
        if k in KoalaPolicy.model_fields and k not in SimConfig.__dataclass_fields__:
            policy[k] = data.pop(k)
    unknown = set(data) - set(SimConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    return SimConfig(**data, policy=KoalaPolicy.model_validate(policy))
