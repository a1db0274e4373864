"""Artifact manifests (`{arch}_{H}x{W}x{C}.json`) and lookup of the packaged artifacts.

The manifest is written by `koala zoo build` (server_app.zoo.builder) next to the .tflite files;
the device reads it to know shapes, weight names, costs and the inference-model patch table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARTIFACTS_DIR = Path(__file__).resolve().parent.parent / "artifacts"


@dataclass(frozen=True)
class ArtifactManifest:
    """Typed view of one manifest JSON; `raw` keeps every field (incl. the patch table)."""

    path: Path  # the manifest file
    raw: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.raw["name"])

    @property
    def arch(self) -> str:
        return str(self.raw["arch"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.raw["input_shape"]
        return int(h), int(w), int(c)

    @property
    def num_classes(self) -> int:
        return int(self.raw["num_classes"])

    @property
    def train_batch(self) -> int:
        return int(self.raw["train_batch"])

    @property
    def param_count(self) -> int:
        return int(self.raw["param_count"])

    @property
    def weight_names(self) -> list[str]:
        return [w["name"] for w in self.raw["weights"]]

    @property
    def weight_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(w["shape"]) for w in self.raw["weights"]]

    @property
    def sha256(self) -> str:
        return str(self.raw["sha256"])

    @property
    def tflite_path(self) -> Path:
        return self.path.parent / str(self.raw["tflite_file"])

    @property
    def inference_path(self) -> Path:
        return self.path.parent / str(self.raw["inference"]["file"])

    def summary(self) -> dict[str, Any]:
        """The resource numbers reported per device (paper terms: storage, FLOPs)."""
        keys = (
            "name", "arch", "input_shape", "num_classes", "train_batch", "param_count", "float_bytes",
            "int8_bytes", "tflite_file_bytes", "forward_flops_per_sample", "train_flops_per_sample",
        )  # fmt: skip
        return {k: self.raw[k] for k in keys}


def load_manifest(path: str | Path) -> ArtifactManifest:
    """Manifest for a `.json`, a `.tflite` (its sibling `.json`) or an artifact name."""
    p = Path(path)
    if p.suffix == ".tflite":
        p = p.with_suffix(".json")
    elif p.suffix != ".json":
        p = ARTIFACTS_DIR / f"{p.name}.json" if not p.exists() else p
    if not p.exists():
        raise FileNotFoundError(f"no artifact manifest at {p}")
    return ArtifactManifest(p.resolve(), json.loads(p.read_text()))


def format_input(input_shape: tuple[int, ...] | str) -> str:
    if isinstance(input_shape, str):
        return input_shape.lower()
    return "x".join(str(int(d)) for d in input_shape)


def artifact_path(arch: str, input_shape: tuple[int, int, int] | str, directory: str | Path | None = None) -> Path:
    """Path of the packaged training artifact `{arch}_{H}x{W}x{C}.tflite` (must exist)."""
    d = Path(directory) if directory else ARTIFACTS_DIR
    p = d / f"{arch}_{format_input(input_shape)}.tflite"
    if not p.exists():
        known = ", ".join(m.name for m in list_manifests(d)) or "none"
        raise FileNotFoundError(f"no artifact {p.name} in {d} (available: {known})")
    return p


def list_manifests(directory: str | Path | None = None) -> list[ArtifactManifest]:
    d = Path(directory) if directory else ARTIFACTS_DIR
    return [load_manifest(p) for p in sorted(d.glob("*.json"))]
