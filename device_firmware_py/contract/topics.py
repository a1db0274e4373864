"""Every MQTT topic of KOALA Edge, built and parsed in one place.

Why one module: the device agent, the server, the ACL generator and the AsyncAPI document must agree
on every topic string; building them anywhere else lets them drift. All topics live under the
versioned prefix ``koala/v1`` so a v2 contract can run beside v1 on the same broker.

Nothing here depends on MQTT 5: retained flags, QoS and Last Will are MQTT 3.1.1 features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ContractError

PREFIX = "koala/v1"
VERSION = 1

# Device ids go into topics and file names: a conservative alphabet, no MQTT wildcards (+ #), no '/',
# no '$' (reserved for broker topics), no spaces, bounded length.
DEVICE_ID_MAX_LEN = 64
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
MAX_ROUND_ID = 2**53  # fits an int64 column and a JSON number exactly


@dataclass(frozen=True)
class TopicSpec:
    """How a topic kind is used: who publishes, QoS, retained. The AsyncAPI test checks these."""

    kind: str
    template: str  # relative to PREFIX, with {device_id} / {round_id}
    direction: str  # "device->server" | "server->device" | "server->all"
    qos: int
    retained: bool
    message: str  # message class name in messages.py


SPECS: dict[str, TopicSpec] = {
    s.kind: s
    for s in (
        TopicSpec("device_status", "devices/{device_id}/status", "device->server", 1, True, "DeviceStatus"),
        TopicSpec("assign", "devices/{device_id}/down/assign", "server->device", 1, False, "Assignment"),
        TopicSpec("verdict", "devices/{device_id}/down/verdict", "server->device", 1, False, "ResultVerdict"),
        TopicSpec("result", "devices/{device_id}/up/result", "device->server", 1, False, "Result"),
        TopicSpec("progress", "devices/{device_id}/up/progress", "device->server", 0, False, "Progress"),
        TopicSpec("round_status", "rounds/{round_id}/status", "server->all", 1, True, "RoundStatus"),
        TopicSpec("round_current", "rounds/current", "server->all", 1, True, "RoundStatus"),
        TopicSpec("server_status", "server/status", "server->all", 1, True, "ServerStatus"),
        # the edge-cloud cascade (opt-in per device): inputs the device's model is unsure of, and the answers
        TopicSpec("predict_request", "devices/{device_id}/up/predict", "device->server", 1, False, "PredictRequest"),
        TopicSpec("predict_answer", "devices/{device_id}/down/predict", "server->device", 1, False, "PredictAnswer"),
    )
}


def validate_device_id(device_id: object) -> str:
    """Return the id unchanged if it is safe inside a topic, else raise ContractError('bad_device_id')."""
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.fullmatch(device_id):
        raise ContractError("bad_device_id", f"device id {device_id!r} must match {_DEVICE_ID_RE.pattern}")
    return device_id


def validate_round_id(round_id: object) -> int:
    if isinstance(round_id, bool) or not isinstance(round_id, int) or not 0 <= round_id <= MAX_ROUND_ID:
        raise ContractError("bad_field", f"round id {round_id!r} must be an int in [0, 2**53]")
    return round_id


def _t(kind: str, **kw: object) -> str:
    return f"{PREFIX}/" + SPECS[kind].template.format(**kw)


# ---- topic builders (one per SPECS entry) ----------------------------------------------------------


def device_client_id(device_id: str) -> str:
    """The MQTT client id a device must connect with. A hardened broker binds each device account to
    it (dynamic-security `clientid`): a device cannot take over another device's session by
    connecting with that device's id, and cannot use any other id itself."""
    return f"koala-dev-{validate_device_id(device_id)}"


def device_status(device_id: str) -> str:
    """Retained online/offline + capabilities; the offline message is the device's Last Will."""
    return _t("device_status", device_id=validate_device_id(device_id))


def device_assign(device_id: str) -> str:
    """Server -> device round assignment (binary frame with teacher logits / weights)."""
    return _t("assign", device_id=validate_device_id(device_id))


def device_result(device_id: str) -> str:
    """Device -> server result (binary frame with proxy logits / weights)."""
    return _t("result", device_id=validate_device_id(device_id))


def device_verdict(device_id: str) -> str:
    """Server -> device: what became of each result it sent (accepted, or refused with the reason)."""
    return _t("verdict", device_id=validate_device_id(device_id))


def device_progress(device_id: str) -> str:
    """Device -> server progress (QoS 0, best effort)."""
    return _t("progress", device_id=validate_device_id(device_id))


def round_status(round_id: int) -> str:
    """Retained state of round n, for monitors."""
    return _t("round_status", round_id=validate_round_id(round_id))


def rounds_current() -> str:
    """Retained state of the current round: a monitor subscribes here and learns everything."""
    return _t("round_current")


def server_status() -> str:
    """Retained server online/offline; offline is the server's Last Will."""
    return _t("server_status")


def device_predict_request(device_id: str) -> str:
    """Device -> server: inputs for the large model (cascade; sent only by a device configured for it)."""
    return _t("predict_request", device_id=validate_device_id(device_id))


def device_predict_answer(device_id: str) -> str:
    """Server -> device: the large model's answer to a predict request."""
    return _t("predict_answer", device_id=validate_device_id(device_id))


BUILDERS = {
    "device_status": device_status,
    "assign": device_assign,
    "result": device_result,
    "progress": device_progress,
    "verdict": device_verdict,
    "round_status": round_status,
    "round_current": rounds_current,
    "server_status": server_status,
    "predict_request": device_predict_request,
    "predict_answer": device_predict_answer,
}

# ---- subscription filters ----------------------------------------------------------------------


def filter_device_status() -> str:
    return f"{PREFIX}/devices/+/status"


def filter_results() -> str:
    return f"{PREFIX}/devices/+/up/result"


def filter_progress() -> str:
    return f"{PREFIX}/devices/+/up/progress"


def filter_predict_requests() -> str:
    return f"{PREFIX}/devices/+/up/predict"


def filter_device_up() -> str:
    return f"{PREFIX}/devices/+/up/#"


def filter_device_down(device_id: str) -> str:
    return f"{PREFIX}/devices/{validate_device_id(device_id)}/down/#"


def filter_rounds() -> str:
    return f"{PREFIX}/rounds/#"


def filter_everything() -> str:
    return f"{PREFIX}/#"


def shared(group: str | None, topic_filter: str) -> str:
    """`$share/{group}/{filter}` (MQTT 5 and Mosquitto's 3.1.1) or the plain filter when group is None.

    Why optional: amqtt has no shared subscriptions (SUBACK ok, nothing delivered), so callers pass
    None there and run one ingestion worker.
    """
    if group is None:
        return topic_filter
    if not _GROUP_RE.fullmatch(group):
        raise ContractError("bad_topic", f"share group {group!r} must match {_GROUP_RE.pattern}")
    return f"$share/{group}/{topic_filter}"










# ---- ACL grants (used by server_app.provisioning) ----------------------------------------------------


def acl_device_publish(device_id: str) -> list[str]:
    return [device_status(device_id), device_result(device_id), device_progress(device_id),
            device_predict_request(device_id)]


def acl_device_read(device_id: str) -> list[str]:
    return [filter_device_down(device_id), filter_rounds(), server_status()]


def acl_server_read() -> list[str]:
    return [filter_device_status(), filter_device_up(), filter_rounds(), server_status()]


def acl_server_publish() -> list[str]:
    return [f"{PREFIX}/devices/+/down/#", filter_rounds(), server_status()]


# ---- parsing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedTopic:
    kind: str  # a SPECS key
    device_id: str | None = None
    round_id: int | None = None




def parse_topic(topic: object) -> ParsedTopic:
    """Classify a delivered topic and extract + validate its device id / round id.

    Raises ContractError('bad_topic' | 'bad_device_id') for anything not built by this module,
    including wildcards, empty levels, and topics outside the prefix.
    """
    if not isinstance(topic, str) or len(topic) > 256:
        raise ContractError("bad_topic", "topic must be a str of at most 256 characters")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ContractError("bad_topic", f"wildcards are not valid in a delivered topic: {topic!r}")
    if not topic.startswith(PREFIX + "/"):
        raise ContractError("bad_topic", f"topic {topic!r} is not under {PREFIX}/")
    rest = topic[len(PREFIX) + 1 :].split("/")
    if rest == ["rounds", "current"]:
        return ParsedTopic("round_current")
    if rest == ["server", "status"]:
        return ParsedTopic("server_status")
    if len(rest) == 3 and rest[0] == "rounds" and rest[2] == "status":
        n = rest[1]
        if not (n.isascii() and n.isdigit() and len(n) <= 16) or (len(n) > 1 and n[0] == "0"):
            raise ContractError("bad_topic", f"round id {n!r} is not a canonical integer")
        try:
            return ParsedTopic("round_status", round_id=validate_round_id(int(n)))
        except ContractError as exc:
            raise ContractError("bad_topic", exc.detail) from None
    if len(rest) >= 3 and rest[0] == "devices":
        tail = "/".join(rest[2:])
        kind = {"status": "device_status", "down/assign": "assign", "down/verdict": "verdict", "up/result": "result",
                "up/progress": "progress", "up/predict": "predict_request", "down/predict": "predict_answer"}.get(tail)
        if kind is None:
            raise ContractError("bad_topic", f"unknown device topic {topic!r}")
        return ParsedTopic(kind, device_id=validate_device_id(rest[1]))
    raise ContractError("bad_topic", f"unknown topic {topic!r}")
