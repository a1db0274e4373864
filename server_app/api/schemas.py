"""Pydantic request/response models of the REST API (the OpenAPI schema is generated from these).

Why separate from the SQLAlchemy models: the API is a public contract; DB columns (file paths,
credential hashes) must not leak through it, and renaming a column must not break a dashboard.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list. Ask for the next with ``offset=next_offset``; null means the end."""

    items: list[T]
    limit: int
    offset: int
    next_offset: int | None = Field(None, description="offset of the next page, null on the last page")

    @classmethod
    def of(cls, items: list[Any], limit: int, offset: int) -> Page[Any]:
        return cls(items=items, limit=limit, offset=offset, next_offset=offset + limit if len(items) >= limit else None)


class _Orm(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ---- devices ----------------------------------------------------------------------------------------
class DeviceOut(_Orm):
    id: str = Field(examples=["pi-kitchen-01"])
    arch: str | None = Field(None, examples=["cnn_small"])
    status: str = Field(description="last reported status: online | offline | unknown", examples=["online"])
    online: bool
    last_seen: dt.datetime | None = None
    runtime_version: str | None = None
    input_shape: list[int] | None = Field(None, examples=[[28, 28, 1]])
    num_samples: int | None = None
    revoked: bool = False
    created: dt.datetime | None = None


class SubmissionOut(_Orm):
    """One device's part in one round: assigned, then accepted / rejected (with reason) / dropped / late."""

    round_id: int
    device_id: str
    status: str = Field(examples=["accepted"])
    reason: str | None = Field(None, description="contract reason code when rejected or dropped", examples=["bad_shape"])
    bytes_down: int = 0
    bytes_up: int = 0
    digest: str | None = Field(None, description="idempotency key of the submission: sha256 of the result frame's "
                               "prefix + header (the header carries the body's sha256)")
    metrics: dict[str, Any] | None = None
    assigned_at: dt.datetime | None = None
    submitted_at: dt.datetime | None = None
    decided_at: dt.datetime | None = None


class DeviceDetail(DeviceOut):
    label_histogram: list[int] | None = Field(None, examples=[[120, 80, 0, 40, 0, 0, 0, 0, 0, 10]])
    capabilities: dict[str, Any] | None = None
    submissions: list[SubmissionOut] = Field(default_factory=list, description="newest rounds first (up to 50)")


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    revoked: bool = Field(True, description="false re-admits a revoked device")


# ---- rounds -----------------------------------------------------------------------------------------
class RoundCounts(BaseModel):
    assigned: int = 0
    submitted: int = 0
    accepted: int = 0
    rejected: int = 0
    dropped: int = 0
    late: int = 0
    received: int = 0


class RoundOut(_Orm):
    id: int = Field(examples=[3])
    state: str = Field(examples=["collecting"], description="created | collecting | aggregating | completed | failed | aborted")
    strategy: str = Field(examples=["koala_homo"])
    created: dt.datetime | None = None
    started: dt.datetime | None = None
    deadline: dt.datetime | None = None
    finished: dt.datetime | None = None
    quorum: int = 1
    participants: list[str] = Field(default_factory=list)
    model_version: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    counts: RoundCounts = Field(default_factory=RoundCounts)


class RoundDetail(RoundOut):
    config: dict[str, Any] = Field(default_factory=dict)
    submissions: list[SubmissionOut] = Field(default_factory=list)
    rejections: list[EventOut] = Field(default_factory=list, description="rejection events of this round, newest first")


class RoundStartRequest(BaseModel):
    """Optional note for the event log; the round runs with the server's configured strategy."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "new devices joined"}]})
    reason: str | None = Field(None, max_length=200, description="free text recorded in the event log")


class RoundStartResponse(BaseModel):
    round_id: int | None = Field(None, description="id of the round that will run next (null when not known yet)")
    accepted: bool = True
    detail: str = Field(examples=["round 4 starting"])


class RoundStopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("stopped by operator", max_length=200)


class RoundStopResponse(BaseModel):
    round_id: int | None
    stopped: bool
    detail: str


class SchedulePolicy(BaseModel):
    """When the orchestrator runs rounds on its own. With ``auto`` it runs rounds back to back (waiting
    ``interval_s`` between them) until ``rounds`` rounds exist, each once ``min_devices`` are online;
    POST /rounds/start always runs one more."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"auto": True, "rounds": 20, "min_devices": 3, "interval_s": 60}]})
    auto: bool = Field(description="run rounds automatically")
    rounds: int = Field(ge=0, description="automatic rounds stop once this many round ids were used")
    min_devices: int = Field(ge=1, description="online devices needed before a round starts")
    interval_s: float = Field(ge=0, description="pause between automatic rounds")


class SchedulePolicyUpdate(BaseModel):
    """Fields to change; omitted fields keep their value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"auto": False}, {"rounds": 50, "interval_s": 600}]})
    auto: bool | None = None
    rounds: int | None = Field(None, ge=0, le=1_000_000)
    min_devices: int | None = Field(None, ge=1, le=100_000)
    interval_s: float | None = Field(None, ge=0, le=7 * 86_400)


# ---- models -----------------------------------------------------------------------------------------
class ModelVersionOut(_Orm):
    id: int
    kind: str = Field(examples=["large"], description="large | small")
    arch: str = Field(examples=["vgg_large"])
    version: int
    sha256: str = Field(description="of the stored file (for a large model: its training checkpoint)")
    bytes: int
    round_id: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: dt.datetime | None = None
    download: str = Field(description="URL of the model: a large model's portable safetensors export "
                          "(docs/models.md), a small model's stored file", examples=["/api/v1/models/large/large/3/download"])
    formats: dict[str, str] = Field(default_factory=dict, description="large models with a portable export: "
                                    "download URL per format (safetensors, pt, torchscript, onnx, card, checkpoint)")


# ---- metrics history ----------------------------------------------------------------------------------
class RoundMetricsOut(BaseModel):
    round_id: int
    state: str
    finished: dt.datetime | None = None
    large_acc: float | None = Field(None, description="large-model test accuracy after the round")
    small_acc: float | None = Field(None, description="mean small-model test accuracy reported for the round")
    kd_loss: float | None = Field(None, description="reverse-KD loss of the large model")
    bytes_up: int = Field(0, description="device -> server payload bytes")
    bytes_down: int = Field(0, description="server -> device payload bytes")
    accepted: int = 0
    rejected: int = 0
    metrics: dict[str, float] = Field(default_factory=dict, description="every numeric metric stored for the round")


# ---- events -----------------------------------------------------------------------------------------
class EventOut(_Orm):
    id: int
    ts: dt.datetime
    level: str = Field(examples=["warning"])
    kind: str = Field(examples=["rejected"])
    device_id: str | None = None
    round_id: int | None = None
    detail: dict[str, Any] = Field(default_factory=dict, examples=[{"reason": "bad_digest", "bytes": 100412}])


RoundDetail.model_rebuild()


# ---- live ---------------------------------------------------------------------------------------------
class LiveSnapshot(BaseModel):
    """Everything the dashboard's live view needs in one document (also the SSE `snapshot` event)."""

    ts: dt.datetime
    devices: list[DeviceOut]
    online: int
    current_round: RoundOut | None
    last_event_id: int
