"""KoalaPolicy: THE typed description of how KOALA runs, shared by `koala sim`, `koala demo` and
`koala serve`.

Why one object: three configuration systems had drifted apart (the temperature was `T`,
`temperature` and `kd["T"]`; `kd_epochs` meant forward KD in one and reverse KD in another), and
the best measured setting could not be expressed where it mattered (the deployed server). Now
every path reads the same pydantic model, through the same strategy builder
(`server_app.engine.strategies.build_strategy`); the deployed server reads it from its config
file (`[policy]` section) and `KOALA_POLICY__*` env vars, the simulator from its config file's
`policy` section (plus per-method overrides), the demo from flags.

**Defaults are the best measured setting** (README "Results"; `research/koala_experiment.py` and
`research/koala_full.py`, Fashion-MNIST, 20 devices): homogeneous KOALA with 5 local epochs, 1
forward-KD epoch, 4 reverse-KD epochs, every proxy image every round (at full scale, 55,000 device
images: 1,000 of 5,000 per round trailed FedAvg-large by 4-12 pt, all 5,000 by 0.5 at α 0.5 and led
it at α 0.1); heterogeneous fleets fuse device logits class-aware (each device votes on a class in
proportion to its capped share of that class's training data: at full scale +1.2 pt over entropy
fusion at α 0.5, +6 pt at α 0.1, and far less hurt by a coordinated one-hot minority when no proxy
labels exist; README Results, docs/security.md); devices upload their proxy logits as int8 (half
float16's bytes; at full scale 0.762 vs 0.764, α 0.1 seed 0). The robustness defaults
(`count_cap`, `outlier_factor`, `clip_factor`, `agreement_filter`, `canary_filter`) were chosen by
`bench/attacks.py` against their clean cost (docs/security.md). A field that the chosen strategy
cannot use, set explicitly, is an error — never ignored. Data sets the defaults do not fit ship
their own policy file (`server_app/policies/`, e.g. digits).

Names (one per concept, used everywhere): `local_epochs`/`lr` (device, private data),
`fkd_*` (forward KD: large -> small, on the devices), `rkd_*` (reverse KD: small -> large, on
the server), `temperature` (both KD directions).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FUSION_RULES = ("mean", "weighted", "entropy", "class_aware", "group", "median", "trimmed_mean", "agreement")
WEIGHT_RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "cosine")
BUILTIN_STRATEGIES = ("koala_homo", "koala_hetero", "fedavg_small", "fedavg_large", "local_only")
_STRATEGY_REF = re.compile(r"[a-z][a-z0-9_]{0,63}|[A-Za-z_][\w.]*:[A-Za-z_]\w*")

# Fields every strategy uses (round machinery), whatever it is.
ROUND_FIELDS = frozenset({"strategy", "archs", "rounds", "participants", "min_devices",
                          "min_devices_timeout_s", "quorum_fraction",
                          "deadline_s", "deadline_factor", "deadline_min_s", "seed", "large", "plugin_options"})  # fmt: skip


class LargeModelSpec(BaseModel):
    """The server's large model: the built-in VGG-style CNN (`server_app.models.large`) or a
    `module:attr` factory `(input_shape, num_classes, seed, **options) -> torch.nn.Module`."""

    model_config = ConfigDict(extra="forbid")
    factory: str | None = None  # module:attr; None = built-in LargeCNN
    width: int = Field(16, ge=1, le=1024)  # built-in: channels of the first conv block
    options: dict[str, Any] = Field(default_factory=dict)  # extra kwargs for the factory / LargeCNN

    @field_validator("factory")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None and ":" not in v:
            raise ValueError(f"{v!r} must be 'module:attr'")
        return v


class KoalaPolicy(BaseModel):
    """How rounds run. See module docstring; `koala serve --print-config` shows the effective one."""

    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True)

    strategy: str = Field("koala_homo", description="koala_homo | koala_hetero | fedavg_small | fedavg_large | local_only | module:attr")
    archs: list[str] = Field(default_factory=lambda: ["cnn_small"], min_length=1,
                             description="small architectures: one for homo, several (round-robin) for hetero")
    # --- device work, per round
    local_epochs: int = Field(5, ge=0, le=1000, description="passes over each device's private data")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="device learning rate (Adam)")
    fkd_epochs: int = Field(1, ge=0, le=1000, description="forward KD (large -> small) passes on the device, before local training")
    fkd_lr: float = Field(1e-3, gt=0.0, le=10.0)
    post_fkd_epochs: int = Field(0, ge=0, le=1000, description="forward KD passes after local training")
    fkd_from_round: int = Field(1, ge=0, description="first round with forward KD (round 0's large model is untrained)")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="softmax temperature of both KD directions")
    logits_dtype: Literal["float32", "float16", "int8"] = Field(
        "int8", description="wire dtype devices are asked to upload proxy logits in (int8: one scale per tensor, half "
                            "float16's bytes; measured at full scale in README Results)")
    # --- server work, per round
    proxy_per_round: int | None = Field(None, ge=1, description="proxy images sampled per round (None: all; at full "
                                                                "scale all 5,000 beat 1,000 by 4-12 pt, README Results)")
    rkd_epochs: int = Field(4, ge=0, le=1000, description="reverse KD (small -> large) passes on the server")
    rkd_lr: float = Field(1e-3, gt=0.0, le=10.0)
    rkd_batch: int = Field(256, ge=1, le=65536)
    teacher: Literal["avg_model", "device_logits"] | None = Field(
        None, description="avg_model: FedAvg the small weights per arch (paper); device_logits: every device's "
                          "logits is a teacher. None: koala_homo -> avg_model, koala_hetero -> device_logits")
    fusion: str = Field("class_aware", description=f"how teachers' logits are fused: {', '.join(FUSION_RULES)} "
                                                   "(class_aware: by each teacher's capped label histogram)")
    rkd: Literal["fused", "per_group"] = "fused"
    weight_rule: str = Field("fedavg", description=f"how uploaded small weights are averaged: {', '.join(WEIGHT_RULES)} "
                                                   "(median, trimmed_mean, krum bound one device's influence)")
    agreement_filter: float | None = Field(
        0.3, gt=0.0, le=1.0, description="drop a device whose model agrees with the ensemble's median consensus on the "
                                         "proxy rows less than this x the median device does (None: keep all)")
    canary_filter: float | None = Field(
        0.7, gt=0.0, le=1.0, description="where the server knows the labels of some proxy rows (proxy_labels.npz): drop "
                                         "a device whose informedness on the round's labeled rows (weighted by its own label "
                                         "histogram) is below this x the median device's, or within 0.05 of chance "
                                         "(None: ignore the labels)")
    count_cap: float | None = Field(2.0, gt=0.0, description="self-reported sample counts are capped at this x their "
                                    "median before any sample-weighted average (None: trusted as sent)")
    outlier_factor: float | None = Field(
        4.0, gt=1.0, description="drop (not clip) a device whose weight update is longer than this x the median update "
                                 "norm (x its sample count / the median count, between 1 and count_cap: more data, more "
                                 "steps): a sign-flipped or rescaled model, not an honest one (None: keep all)")
    clip_factor: float | None = Field(2.0, gt=0.0, description="clip each device's weight update to this x the median "
                                                                "update norm before averaging (None: no clipping)")
    anchor_lambda: float = Field(0.0, ge=0.0, description="L2 anchor of reverse KD to the pre-round large model")
    gate_collapse_frac: float | None = Field(
        None, gt=0.5, le=1.0, description="model gate: also refuse a new large model predicting one class for more "
                                          "than this share of a held-out proxy slice (None: refuse only non-finite models)")
    # --- rounds
    rounds: int = Field(10, ge=1, le=1_000_000)
    participants: float | None = Field(
        None, gt=0.0, description="devices per round: a count (>= 1) or a fraction (< 1) of the online fleet; "
                                  "None: all. Sampled with the seed, least-recently-used first (fair)")
    min_devices: int = Field(2, ge=1, description="online devices needed before a round starts; rounds wait for "
                                                  "them (see min_devices_timeout_s)")
    min_devices_timeout_s: float | None = Field(
        None, gt=0.0, description="after waiting this many seconds, start a round with fewer than min_devices online "
                                  "(at least 1). None (the default, and what production should keep): wait for "
                                  "min_devices however long it takes")
    quorum_fraction: float = Field(0.5, gt=0.0, le=1.0, description="accepted results needed to close a round")
    deadline_s: float = Field(120.0, gt=0.0, description="seconds a round waits for results (with deadline_factor: "
                                                         "the most it waits, extensions included)")
    deadline_factor: float | None = Field(
        None, gt=1.0, description="size each round's deadline as this x the 90th-percentile measured round time of "
                                  "its slowest architecture (at least deadline_min_s, at most deadline_s); a device still "
                                  "reporting progress at the deadline extends it (None: always deadline_s)")
    deadline_min_s: float = Field(10.0, gt=0.0, description="shortest deadline deadline_factor may set")
    seed: int = 0
    large: LargeModelSpec = Field(default_factory=LargeModelSpec)
    plugin_options: dict[str, Any] = Field(default_factory=dict, description="free options for a module:attr strategy")

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        if not _STRATEGY_REF.fullmatch(v):
            raise ValueError(f"{v!r} is neither a strategy name ({', '.join(BUILTIN_STRATEGIES)}) nor module:attr")
        if ":" not in v and v not in BUILTIN_STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; built in: {', '.join(BUILTIN_STRATEGIES)} (or module:attr)")
        return v

    @field_validator("fusion")
    @classmethod
    def _fusion(cls, v: str) -> str:
        if v not in FUSION_RULES and ":" not in v:
            raise ValueError(f"{v!r} is not one of {FUSION_RULES} (or module:attr)")
        return v

    @field_validator("weight_rule")
    @classmethod
    def _weight_rule(cls, v: str) -> str:
        if v not in WEIGHT_RULES:
            raise ValueError(f"{v!r} is not one of {WEIGHT_RULES}")
        return v

    @field_validator("archs")
    @classmethod
    def _archs(cls, v: list[str]) -> list[str]:
        from server_app.zoo.archs import ARCHS  # the zoo's list: the one source of architecture names

        bad = [a for a in v if a not in ARCHS]
        if bad:
            raise ValueError(f"unknown architectures {bad}; known: {', '.join(ARCHS)}")
        return v

    @field_validator("participants")
    @classmethod
    def _participants(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and v != int(v):
            raise ValueError("a count of participants must be a whole number (or a fraction below 1)")
        return v

    @model_validator(mode="after")
    def _mode(self) -> KoalaPolicy:
        if self.strategy == "koala_homo" and len(set(self.archs)) != 1:
            raise ValueError(f"koala_homo needs exactly one architecture, got {self.archs} (use koala_hetero)")
        return self

    # ------------------------------------------------------------------ helpers
    def resolved_teacher(self) -> str:
        if self.teacher is not None:
            return self.teacher
        return "avg_model" if self.strategy == "koala_homo" else "device_logits"

    def explicit(self) -> set[str]:
        """Fields set by the user (file, env, flags), not left at their default."""
        return set(self.model_fields_set)

    def with_overrides(self, **changes: Any) -> KoalaPolicy:
        """A validated copy with `changes` applied (they count as explicitly set)."""
        data = {k: getattr(self, k) for k in self.model_fields_set}
        data.update(changes)
        return KoalaPolicy.model_validate(data)


class PolicyError(ValueError):
    """The policy asks for something the chosen strategy cannot do."""


def check_fields_used(policy: KoalaPolicy, used: frozenset[str] | set[str], only: set[str] | None = None) -> None:
    """Raise PolicyError naming every explicitly set field (of `only`, when given) the strategy
    would ignore."""
    explicit = policy.explicit() if only is None else policy.explicit() & set(only)
    unused = sorted(explicit - set(used) - ROUND_FIELDS)
    if unused:
        raise PolicyError(
            f"policy fields {unused} are not used by strategy {policy.strategy!r}"
            f"{' with teacher ' + policy.resolved_teacher() if policy.strategy.startswith('koala') else ''}; "
            f"remove them (it uses: {', '.join(sorted(set(used) - ROUND_FIELDS))})"
        )


def bundled_policy(dataset: str | None) -> Path | None:
    """The policy file shipped for a data set the defaults do not fit (server_app/policies/NAME.toml)."""
    if not dataset:
        return None
    p = Path(__file__).resolve().parent / "policies" / f"{dataset}.toml"
    return p if p.is_file() else None


def read_mapping_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A .toml / .yaml / .json file holding a mapping; PolicyError (one line) when it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise PolicyError(f"{what} {p} does not exist")
    loaders = {".json": "json", ".toml": "tomllib", ".yaml": "yaml", ".yml": "yaml"}
    if p.suffix not in loaders:
        raise PolicyError(f"{what} {p.name}: use .toml, .yaml/.yml or .json")
    try:
        import importlib

        mod = importlib.import_module(loaders[p.suffix])
        text = p.read_text()
        data = (mod.safe_load(text) or {}) if p.suffix in (".yaml", ".yml") else mod.loads(text)
    except Exception as exc:  # parse errors of any of the three formats
        raise PolicyError(f"{what} {p} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{what} {p} must hold a mapping")
    return data


def read_policy_file(path: str | Path) -> dict[str, Any]:
    """A policy file (.toml / .yaml / .json): its `policy` section, or its fields at the top level.

    The same file works for `koala sim --policy`, `koala demo --policy` and `koala serve --policy`
    (and as the `[policy]` section of the server's settings file)."""
    data = read_mapping_file(path, "policy file")
    section = data.get("policy", data)
    if not isinstance(section, dict):
        raise PolicyError(f"policy file {path}: `policy` must be a mapping")
    return dict(section)
