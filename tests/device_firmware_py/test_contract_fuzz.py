"""Hypothesis fuzzing: any input to a decoder gives a valid message or ContractError, nothing else."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_firmware_py.contract import (
    REASONS,
    ContractError,
    Message,
    Result,
    decode,
    decode_for_topic,
    encode,
    topics,
)
from device_firmware_py.contract.codec import MAGIC

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def must_be_message_or_contract_error(fn, *args) -> None:
    try:
        out = fn(*args)
    except ContractError as e:
        assert e.reason in REASONS
        return
    msg = out[1] if isinstance(out, tuple) else out
    assert isinstance(msg, (Message, topics.ParsedTopic))


@FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes(data):
    must_be_message_or_contract_error(decode, data)


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_bytes_behind_a_frame_prefix(data, kind, hlen):
    must_be_message_or_contract_error(decode, struct.pack(">4sBBHI", MAGIC, 1, kind, 0, min(hlen, len(data))) + data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["device_id", "round_id", "state", "arch", "phase", "step", "loss", "participants", "metrics", "capabilities",
     "label_histogram", "input_shape", "num_samples", "ts", "received", "deadline", "current_round", "version"]
)


@FUZZ
@given(st.sampled_from(["device_status", "progress", "round_status", "server_status", "result", 7]),
       st.dictionaries(FIELDS, JSON, max_size=8))
def test_json_shaped_control_messages(kind, fields):
    payload = json.dumps({"v": 1, "type": kind, **fields}).encode()
    must_be_message_or_contract_error(decode, payload)


@FUZZ
@given(st.dictionaries(st.sampled_from(["round_id", "device_id", "model_version", "meta", "weights", "tensors"]), JSON, max_size=6),
       st.binary(max_size=64))
def test_frames_with_fuzzed_headers(header, body):
    header = {**header, "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
    h = json.dumps(header).encode()
    must_be_message_or_contract_error(decode, struct.pack(">4sBBHI", MAGIC, 1, 2, 0, len(h)) + h + body)


VALID = encode(
    Result(3, "dev-1", "cnn_small", 10, label_histogram=[1, 2], metrics={"l": 0.5},
           proxy_logits=np.arange(20, dtype=np.float32).reshape(10, 2), weights=[np.ones(3, np.float32)]),
    weights_dtype="int8",
)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(VALID)))
def test_mutated_valid_frames(flips, cut):
    data = bytearray(VALID)
    for pos, val in flips:
        data[pos] = val
    must_be_message_or_contract_error(decode, bytes(data[:cut] if cut < 12 else data))


@FUZZ
@given(st.text(max_size=80), st.binary(max_size=64))
def test_topics_and_topic_bound_decoding(topic, payload):
    must_be_message_or_contract_error(decode_for_topic, topic, payload)
    must_be_message_or_contract_error(topics.parse_topic, topic)
