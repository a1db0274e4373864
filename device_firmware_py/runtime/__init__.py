"""LiteRT small-model runtime: on-device training/distillation (SmallModel), manifests, int8 export.

Only numpy + ai-edge-litert (+ ai-edge-quantizer for int8) are used; never torch or tensorflow.
Submodules are imported lazily by users (`from device_firmware_py.runtime.small_model import
SmallModel`) so importing this package costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from device_firmware_py.runtime.manifest import ArtifactManifest, artifact_path, load_manifest
    from device_firmware_py.runtime.small_model import SmallModel

__all__ = ["SmallModel", "ArtifactManifest", "artifact_path", "load_manifest"]


def __getattr__(name: str) -> Any:
    if name == "SmallModel":
        from device_firmware_py.runtime.small_model import SmallModel

        return SmallModel
    if name in ("ArtifactManifest", "artifact_path", "load_manifest"):
        from device_firmware_py.runtime import manifest

        return getattr(manifest, name)
    raise AttributeError(name)
