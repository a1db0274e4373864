"""Devices: the fleet as the registry knows it (list, detail, revoke)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy.orm import Session

from server_app.api import problems
from server_app.api.auth import require_read, require_write
from server_app.api.deps import db
from server_app.api.schemas import DeviceDetail, DeviceOut, Page, RevokeRequest, SubmissionOut
from server_app.registry import crud
from server_app.registry.models import Device

router = APIRouter(prefix="/devices", tags=["devices"])
DeviceId = Annotated[str, Path(description="device id", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", examples=["pi-kitchen-01"])]


def _out(d: Device, cls: type[DeviceOut] = DeviceOut, **extra: object) -> DeviceOut:
    data = {c: getattr(d, c) for c in cls.model_fields if hasattr(d, c)}
    data.update(online=d.status == "online", **extra)
    return cls.model_validate(data)


@router.get(
    "",
    summary="List devices",
    description="Registered devices, ordered by id, filterable by last status and architecture. "
    "Revoked devices are hidden unless `include_revoked=true`.",
    response_model=Page[DeviceOut],
    dependencies=[Depends(require_read)],
    responses=problems.READ_ERRORS,
)
def list_devices(
    s: Annotated[Session, Depends(db)],
    status: Annotated[Literal["online", "offline", "unknown"] | None, Query(description="last reported status")] = None,
    arch: Annotated[str | None, Query(max_length=64, description="small-model architecture", examples=["cnn_small"])] = None,
    include_revoked: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[DeviceOut]:
    rows = crud.list_devices(s, status=status, arch=arch, include_revoked=include_revoked, limit=limit, offset=offset)
    return Page[DeviceOut].of([_out(d) for d in rows], limit, offset)  # type: ignore[return-value]


@router.get(
    "/{device_id}",
    summary="Device detail",
    description="Last seen, architecture, state, label histogram and the device's submissions (newest round first).",
    response_model=DeviceDetail,
    dependencies=[Depends(require_read)],
    responses={**problems.READ_ERRORS, **problems.NOT_FOUND},
)
def get_device(device_id: DeviceId, s: Annotated[Session, Depends(db)]) -> DeviceOut:
    d = crud.get_device(s, device_id)
    subs = crud.list_assignments(s, device_id=device_id, limit=1000)
    subs = sorted(subs, key=lambda a: a.round_id, reverse=True)[:50]
    return _out(d, DeviceDetail, submissions=[SubmissionOut.model_validate(a) for a in subs])


@router.post(
    "/{device_id}/revoke",
    summary="Revoke (or re-admit) a device",
    description="A revoked device is excluded from rounds and its messages are rejected as `revoked_device`. "
    "Broker credentials are revoked separately (`koala provision revoke`).",
    response_model=DeviceOut,
    dependencies=[Depends(require_write)],
    responses={**problems.WRITE_ERRORS, **problems.NOT_FOUND},
)
def revoke_device(device_id: DeviceId, s: Annotated[Session, Depends(db)], body: RevokeRequest | None = None) -> DeviceOut:
    revoked = True if body is None else body.revoked
    d = crud.revoke_device(s, device_id, revoked)
    crud.record_event(s, "device_revoked" if revoked else "device_readmitted", level="warning", device_id=device_id)
    return _out(d)
