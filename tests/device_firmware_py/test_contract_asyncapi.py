"""asyncapi.yaml and the contract module describe the same thing: every topic builder has a channel
with the right QoS/retain, every message class has a schema, and real encoded messages validate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from test_contract import sample_messages

from device_firmware_py.contract import codec, decode, encode, errors, messages, topics

DOC = yaml.safe_load((Path(codec.__file__).parent / "asyncapi.yaml").read_text())
MSGS = DOC["components"]["messages"]


def test_document_header():
    assert DOC["asyncapi"] == "3.0.0"
    assert sorted(DOC["x-koala-reject-reasons"]) == sorted(errors.REASONS)


def test_every_topic_has_one_channel_with_its_qos_and_retain():
    by_kind = {c["x-koala-kind"]: (name, c) for name, c in DOC["channels"].items()}
    assert set(by_kind) == set(topics.SPECS) == set(topics.BUILDERS)
    for kind, spec in topics.SPECS.items():
        name, ch = by_kind[kind]
        template = spec.template.replace("{device_id}", "{deviceId}").replace("{round_id}", "{roundId}")
        assert ch["address"] == f"{topics.PREFIX}/{template}"
        assert list(ch["messages"]) == [spec.message]
        # the address with parameters filled in is exactly what the builder makes
        build = topics.BUILDERS[kind]
        args = ("dev-1",) if "{deviceId}" in ch["address"] else (7,) if "{roundId}" in ch["address"] else ()
        assert ch["address"].replace("{deviceId}", "dev-1").replace("{roundId}", "7") == build(*args)
        ops = [o for o in DOC["operations"].values() if o["channel"]["$ref"] == f"#/channels/{name}"]
        assert len(ops) == 1, name
        assert ops[0]["action"] == ("receive" if spec.direction.startswith("device") else "send")
        assert ops[0]["bindings"]["mqtt"]["qos"] == spec.qos
        assert ops[0]["bindings"]["mqtt"]["retain"] == spec.retained


def test_every_message_class_has_a_schema():
    assert set(MSGS) == {c.__name__ for c in messages.ALL_MESSAGES.values()}
    for cls in messages.ALL_MESSAGES.values():
        m = MSGS[cls.__name__]
        assert m["name"] == cls.TYPE
        fields = {f.name for f in dataclasses.fields(cls)}
        if cls.TYPE in messages.CONTROL_MESSAGES:
            assert m["contentType"] == "application/json"
            assert set(m["payload"]["properties"]) - {"v", "type"} == fields
        else:
            assert m["contentType"] == "application/octet-stream"
            assert m["x-koala-frame-kind"] == codec._KIND_IDS[cls.TYPE]
            header = m["x-koala-frame-header"]["properties"]
            meta = set(header["meta"]["properties"])
            assert meta | {"round_id", "device_id", "model_version"} | set(cls.TENSOR_FIELDS) == fields
            assert header["tensors"]["items"]["properties"]["dtype"]["enum"] == list(codec.WIRE_DTYPES)


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: m.TYPE)
def test_encoded_messages_validate_against_the_document_and_round_trip(msg):
    data = encode(msg)
    schema_doc = MSGS[type(msg).__name__]
    if msg.TYPE in messages.CONTROL_MESSAGES:
        jsonschema.Draft7Validator(schema_doc["payload"]).validate(json.loads(data))
    else:
        kind, header, _body = codec.read_frame_header(data)
        assert kind == msg.TYPE
        jsonschema.Draft7Validator(schema_doc["x-koala-frame-header"]).validate(header)
    back = decode(data, type(msg))
    assert back.equals(msg, 0.02) if hasattr(back, "equals") else back == msg


def test_schema_rejects_what_the_codec_rejects():
    """Spot check the other direction: an out-of-range value fails both the schema and the codec."""
    bad = {"v": 1, "type": "progress", "device_id": "d/1", "round_id": 1, "phase": "train"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(MSGS["Progress"]["payload"]).validate(bad)
    with pytest.raises(errors.ContractError):
        decode(json.dumps(bad).encode())
