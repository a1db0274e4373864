"""Models: large/small model versions from the registry, their portable exports (docs/models.md:
safetensors + model card, TorchScript, ONNX; the global small models as float / int8 LiteRT) and
the small-model training artifacts devices run. The logic is in server_app/models/export.py.

Downloads carry the file's sha256 (``X-Content-SHA256`` and RFC 3230 ``Digest``) so a client can
verify what it received; for registry versions the hash is the one recorded when the model was
stored, so a file changed on disk after the fact is detected by the client.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from device_firmware_py.runtime.manifest import ARTIFACTS_DIR
from server_app.api import problems
from server_app.api.auth import require_read
from server_app.api.deps import db
from server_app.api.queries import find_model_version
from server_app.api.schemas import ModelVersionOut, Page
from server_app.models import export as mx
from server_app.models.card import CardError
from server_app.registry import crud
from server_app.registry.models import ModelVersion

router = APIRouter(prefix="/models", tags=["models"])
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
Version = Annotated[int, Path(ge=0, le=2**31 - 1)]  # Integer column: larger was a 500
LargeFormat = Literal["safetensors", "pt", "torchscript", "onnx", "card", "checkpoint"]
SmallFormat = Literal["float", "int8"]
LARGE_ARCH = "large"  # the orchestrator registers the large model under this arch
_MEDIA = {".json": "application/json", ".onnx": "application/onnx"}


class ArtifactOut(BaseModel):
    name: str
    bytes: int
    sha256: str
    download: str


def _digest_headers(sha256_hex: str) -> dict[str, str]:
    b64 = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
    return {"X-Content-SHA256": sha256_hex, "Digest": f"sha-256={b64}", "Cache-Control": "no-cache"}


@lru_cache(maxsize=256)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version_out(request: Request, mv: ModelVersion) -> ModelVersionOut:
    url = request.url_for("download_model", kind=mv.kind, arch=mv.arch, version=mv.version)
    data = {c: getattr(mv, c) for c in ModelVersionOut.model_fields if hasattr(mv, c)}
    data["download"] = url.path
    data["metrics"] = dict(mv.metrics or {})
    if mv.kind == "large" and _has_export(mv.path):
        data["formats"] = {f: f"{url.path}?format={f}" for f in (*mx.LARGE_FORMATS, "checkpoint")}
    return ModelVersionOut.model_validate(data)


def _has_export(checkpoint: str) -> bool:
    try:
        return (mx.export_dir_of_checkpoint(checkpoint) / mx.CARD_NAME).is_file()
    except mx.ExportError:
        return False


def _file_response(p: FsPath, filename: str, sha256_hex: str | None = None) -> FileResponse:
    if sha256_hex is None:
        st = p.stat()
        sha256_hex = _file_sha256(str(p), st.st_mtime_ns, st.st_size)
    return FileResponse(p, media_type=_MEDIA.get(p.suffix, "application/octet-stream"), filename=filename,
                        headers=_digest_headers(sha256_hex))  # fmt: skip


def _version_row(s: Session, kind: str, arch: str, version: int) -> ModelVersion:
    mv = find_model_version(s, kind, arch, version)
    if mv is None:
        raise HTTPException(404, detail=f"model {kind}/{arch}/{version} not found")
    return mv


def _export_of(s: Session, version: int | None) -> FsPath:
    """The export directory of a large-model version (None: the newest registered)."""
    if version is None:
        mv = crud.latest_model_version(s, "large", LARGE_ARCH)
        if mv is None:
            raise HTTPException(404, detail="no large model version is registered yet (no round has run)")
    else:
        mv = _version_row(s, "large", LARGE_ARCH, version)
    try:
        edir = mx.export_dir_of_checkpoint(mv.path)
        mx.read_card(edir)
    except (mx.ExportError, CardError) as exc:
        raise HTTPException(404, detail=f"model version {mv.version} has no portable export: {exc}") from None
    return edir


@router.get(
    "",
    summary="List model versions",
    description="Stored large (server) and small (device) model versions, newest first.",
    response_model=Page[ModelVersionOut],
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS,
)
def list_models(
    request: Request,
    s: Annotated[Session, Depends(db)],
    kind: Literal["large", "small"] | None = None,
    arch: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[ModelVersionOut]:
    rows = crud.list_model_versions(s, kind=kind, arch=arch, limit=limit, offset=offset)
    return Page[ModelVersionOut].of([_version_out(request, m) for m in rows], limit, offset)  # type: ignore[return-value]


@router.get(
    "/artifacts",
    summary="List small-model artifacts",
    description="The LiteRT `.tflite` files (with training signatures) and manifests shipped to devices.",
    response_model=list[ArtifactOut],
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS,
)
def list_artifacts(request: Request) -> list[ArtifactOut]:
    out = []
    for p in sorted(ARTIFACTS_DIR.glob("*")):
        if p.suffix in (".tflite", ".json") and p.is_file():
            st = p.stat()
            out.append(
                ArtifactOut(
                    name=p.name,
                    bytes=st.st_size,
                    sha256=_file_sha256(str(p), st.st_mtime_ns, st.st_size),
                    download=request.url_for("download_artifact", name=p.name).path,
                )
            )
    return out


@router.get(
    "/artifacts/{name}",
    name="download_artifact",
    summary="Download a small-model artifact",
    response_class=FileResponse,
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, **problems.NOT_FOUND, 200: {"content": {"application/octet-stream": {}}}},
)
def download_artifact(name: Name) -> FileResponse:
    p = ARTIFACTS_DIR / name
    if p.suffix not in (".tflite", ".json") or not p.is_file() or p.resolve().parent != ARTIFACTS_DIR.resolve():
        raise HTTPException(404, detail=f"artifact {name!r} not found")
    st = p.stat()
    return FileResponse(
        p,
        media_type="application/json" if p.suffix == ".json" else "application/octet-stream",
        filename=p.name,
        headers=_digest_headers(_file_sha256(str(p), st.st_mtime_ns, st.st_size)),
    )


@router.get(
    "/small",
    summary="List the global small models",
    description="The global small model of each architecture in a large-model version (default: the newest), "
    "downloadable as float or int8 LiteRT `.tflite` (`/models/small/{arch}?format=float|int8`).",
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS | problems.NOT_FOUND,
)
def list_small_models(
    request: Request, s: Annotated[Session, Depends(db)], version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None
) -> list[dict[str, Any]]:
    rows = mx.small_models(_export_of(s, version))
    for r in rows:
        url = request.url_for("download_small_model", arch=r["arch"]).path
        r["downloads"] = {f: f"{url}?format={f}&version={r['version']}" for f in mx.SMALL_FORMATS}
    return rows


@router.get(
    "/small/{arch}",
    name="download_small_model",
    summary="Download a global small model",
    description="The global small model of `arch` as a LiteRT inference model (input NHWC float32, output "
    "logits): `float`, or `int8` (full-int8, calibrated on the proxy set like the devices do; input and "
    "output int8 with their quantization parameters in the model). Built on the first request when the "
    "server has not yet.",
    response_class=FileResponse,
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, **problems.NOT_FOUND, 200: {"content": {"application/octet-stream": {}}}},
)
def download_small_model(
    arch: Name,
    s: Annotated[Session, Depends(db)],
    format: SmallFormat = "float",
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> FileResponse:
    edir = _export_of(s, version)
    try:
        p = mx.ensure_small(edir, arch, format)
    except (mx.ExportError, CardError) as exc:
        raise HTTPException(404, detail=str(exc)) from None
    return _file_response(p, f"{arch}-v{edir.name[1:].lstrip('0') or '0'}.{format}.tflite")


@router.get(
    "/{kind}/{arch}/{version}/card",
    summary="A large model's model card",
    description="`model.json` of the version's portable export: builder and options, input shape / layout / "
    "normalisation, class names, round, policy, data digests, accuracy per round, layers and tensors.",
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS | problems.NOT_FOUND,
)
def model_card(
    kind: Literal["large"], arch: Name, version: Version, s: Annotated[Session, Depends(db)]
) -> dict[str, Any]:
    mv = _version_row(s, kind, arch, version)
    try:
        return mx.read_card(mx.export_dir_of_checkpoint(mv.path))
    except (mx.ExportError, CardError) as exc:
        raise HTTPException(404, detail=f"model version {version} has no portable export: {exc}") from None


@router.get(
    "/{kind}/{arch}/{version}/download",
    name="download_model",
    summary="Download a model version",
    description="A large model's portable export (docs/models.md), by `format`: `safetensors` (default; the "
    "state dict, load with safetensors, its model card at `.../card`), `pt` (the state dict for "
    "`torch.load(..., weights_only=True)`), `torchscript`, `onnx`, `card`, or `checkpoint` (the server's "
    "training checkpoint: a torch pickle for resuming, not for users). Formats not built yet are built on "
    "the first request. A small-model version: its stored file. Headers `X-Content-SHA256` / `Digest` "
    "carry the file's hash (for `checkpoint` the one recorded in the registry).",
    response_class=FileResponse,
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, **problems.NOT_FOUND, 200: {"content": {"application/octet-stream": {}}}},
)
def download_model(
    kind: Literal["large", "small"],
    arch: Name,
    version: Version,
    s: Annotated[Session, Depends(db)],
    format: LargeFormat = "safetensors",
) -> FileResponse:
    mv = _version_row(s, kind, arch, version)
    if kind == "small" or format == "checkpoint":
        p = FsPath(mv.path)
        if not p.is_file():
            raise HTTPException(404, detail=f"model {kind}/{arch}/{version} is registered but its file is missing")
        return _file_response(p, f"{kind}-{arch}-v{version}{p.suffix}", mv.sha256)
    try:
        p, recorded_sha = mx.large_file(mv.path, format)
    except (FileNotFoundError, mx.ExportError, CardError) as exc:
        raise HTTPException(404, detail=f"model {kind}/{arch}/{version}: {exc}") from None
    return _file_response(p, f"{arch}-v{version}-{p.name}", recorded_sha)
