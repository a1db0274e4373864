"""Devices: the fleet as the registry knows it (list, detail, revoke)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
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
    "When the server knows the broker's provisioning directory (`broker.provision_dir`), revoking also "
    "deletes the device's broker account over the dynamic-security `$CONTROL` topic: its live session is "
    "disconnected at once and it cannot reconnect (503 and nothing changed if the broker cannot be told). "
    "Re-admitting only clears the registry flag: issue new credentials with `koala provision rotate`.",
    response_model=DeviceOut,
    dependencies=[Depends(require_write)],
    responses={**problems.WRITE_ERRORS, **problems.NOT_FOUND},
)
def revoke_device(
    device_id: DeviceId, request: Request, s: Annotated[Session, Depends(db)], body: RevokeRequest | None = None
) -> DeviceOut:
    revoked = True if body is None else body.revoked
    d = crud.revoke_device(s, device_id, revoked)
    crud.record_event(s, "device_revoked" if revoked else "device_readmitted", level="warning", device_id=device_id)
    if revoked:
        _cut_off_at_broker(request, s, device_id)
    presence = getattr(getattr(request.app.state, "services", None), "presence", None)
    if presence is not None:  # out of every later round and its results refused, at once
        presence.set_revoked(device_id, revoked)
    return _out(d)


def _cut_off_at_broker(request: Request, s: Session, device_id: str) -> None:
    """Delete the broker account; on failure raise 503 so the registry change rolls back too (retry)."""
    from server_app.provisioning.broker_files import DeviceCredential, cut_off
    from server_app.provisioning.dynsec import ControlError, server_control

    svc = getattr(request.app.state, "services", None)
    control = getattr(svc, "broker_control", None)  # injected (tests, embedded), else from settings
    broker_dir = None
    try:
        if control is None:
            found = server_control(getattr(svc, "settings", None))
            if found is None:
                return  # broker not managed by this server: registry-only revoke (documented)
            control, broker_dir = found
        active, offset = [], 0
        while broker_dir is not None:
            page = crud.list_devices(s, limit=crud.MAX_PAGE, offset=offset)
            active += [DeviceCredential(x.id, x.credentials_hash) for x in page if x.credentials_hash]
            if len(page) < crud.MAX_PAGE:
                break
            offset += len(page)
        cut_off(control, broker_dir, device_id, active)
    except (ControlError, OSError) as exc:
        raise HTTPException(503, detail=f"broker not updated (registry unchanged; retry): {exc}") from exc
    crud.record_event(s, "broker_account_deleted", level="warning", device_id=device_id)
