"""Models: large/small model versions from the registry and the small-model artifacts devices run.

Downloads carry the file's sha256 (``X-Content-SHA256`` and RFC 3230 ``Digest``) so a client can
verify what it received; for registry versions the hash is the one recorded when the model was
stored, so a file changed on disk after the fact is detected by the client.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Annotated, Literal

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
from server_app.registry import crud
from server_app.registry.models import ModelVersion

router = APIRouter(prefix="/models", tags=["models"])
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


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
    return ModelVersionOut.model_validate(data)


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
    "/{kind}/{arch}/{version}/download",
    name="download_model",
    summary="Download a model version",
    description="The stored model file (the large model's checkpoint, or a small-model artifact). "
    "Headers `X-Content-SHA256` / `Digest` carry the hash recorded in the registry.",
    response_class=FileResponse,
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, **problems.NOT_FOUND, 200: {"content": {"application/octet-stream": {}}}},
)
def download_model(
    kind: Literal["large", "small"],
    arch: Name,
    version: Annotated[int, Path(ge=0, le=2**31 - 1)],  # Integer column: larger was a 500
    s: Annotated[Session, Depends(db)],
) -> FileResponse:
    mv = find_model_version(s, kind, arch, version)
    if mv is None:
        raise HTTPException(404, detail=f"model {kind}/{arch}/{version} not found")
    p = FsPath(mv.path)
    if not p.is_file():
        raise HTTPException(404, detail=f"model {kind}/{arch}/{version} is registered but its file is missing")
    return FileResponse(
        p, media_type="application/octet-stream", filename=f"{kind}-{arch}-v{version}{p.suffix}", headers=_digest_headers(mv.sha256)
    )
