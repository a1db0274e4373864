"""The KOALA MQTT wire contract: topics, message schemas, codec. Device-safe (numpy + stdlib only).

See asyncapi.yaml next to this file for the same contract as an AsyncAPI 3.0 document.
"""

from __future__ import annotations

from . import codec, messages, plan, topics
from .codec import (
    decode,
    decode_control,
    decode_for_topic,
    decode_frame,
    encode,
    encode_control,
    encode_frame,
    payload_digest,
)
from .errors import REASONS, ContractError
from .messages import (
    ROUND_STATES,
    TERMINAL_ROUND_STATES,
    Assignment,
    DeviceStatus,
    Message,
    PredictAnswer,
    PredictRequest,
    Progress,
    Result,
    ResultVerdict,
    RoundStatus,
    ServerStatus,
)
from .plan import PLAN_VERSION, TrainingPlan

__all__ = [
    "REASONS",
    "ROUND_STATES",
    "TERMINAL_ROUND_STATES",
    "Assignment",
    "ContractError",
    "DeviceStatus",
    "Message",
    "PredictAnswer",
    "PredictRequest",
    "Progress",
    "Result",
    "ResultVerdict",
    "RoundStatus",
    "ServerStatus",
    "PLAN_VERSION",
    "plan",
    "TrainingPlan",
    "codec",
    "decode",
    "decode_control",
    "decode_for_topic",
    "decode_frame",
    "encode",
    "encode_control",
    "encode_frame",
    "messages",
    "payload_digest",
    "topics",
]
