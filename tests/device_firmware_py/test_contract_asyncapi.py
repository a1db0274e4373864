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


# ---- enums, limits, dtypes, client id, Last Will and work eligibility: document == code ------------
def _enum(schema: dict) -> list:
    """The enum of a property, through a oneOf [enum, null]."""
    if "enum" in schema:
        return schema["enum"]
    (e,) = [s["enum"] for s in schema["oneOf"] if "enum" in s]
    return e


def test_enums_match_the_code():
    from device_firmware_py.contract import plan
    from server_app.registry.crud import ROUND_TRANSITIONS

    props = {
        n: MSGS[n]["payload"]["properties"]
        for n in MSGS
        if "payload" in MSGS[n] and "properties" in MSGS[n]["payload"]
    }
    assert props["RoundStatus"]["state"]["enum"] == list(messages.ROUND_STATES)  # no `distilling`
    assert set(ROUND_TRANSITIONS) == set(messages.ROUND_STATES)  # the registry's state machine
    assert props["DeviceStatus"]["state"]["enum"] == list(messages.DEVICE_STATES)
    assert props["ServerStatus"]["state"]["enum"] == list(messages.SERVER_STATES)
    assert props["ResultVerdict"]["status"]["enum"] == list(messages.VERDICTS)
    assert _enum(props["ResultVerdict"]["reason"]) == sorted(errors.REASONS)
    assert props["PredictRequest"]["dtype"]["enum"] == list(messages.PREDICT_DTYPES)
    assert props["PredictAnswer"]["status"]["enum"] == list(messages.PREDICT_STATUSES)
    p = MSGS["Assignment"]["x-koala-frame-header"]["properties"]["meta"]["properties"]["plan"]
    assert set(p["properties"]) == {f.name for f in dataclasses.fields(plan.TrainingPlan)}
    assert set(p["required"]) <= set(p["properties"])
    assert p["properties"]["version"]["const"] == plan.PLAN_VERSION
    assert p["properties"]["task"]["enum"] == list(plan.TASKS)
    assert p["properties"]["upload"]["items"]["enum"] == list(plan.UPLOADS)
    assert p["properties"]["logits_dtype"]["enum"] == list(plan.LOGITS_DTYPES)
    assert DOC["x-koala-dtypes"]["wire"] == list(codec.WIRE_DTYPES) == list(codec.ITEMSIZE)
    assert set(DOC["x-koala-dtypes"]["tensors"]) == {
        "teacher_logits",
        "proxy_indices",
        "weights",
        "proxy_logits",
    }
    for m in ("Assignment", "Result"):
        desc = MSGS[m]["payload"]["description"]
        assert f"version = {codec.FRAME_VERSION}" in desc and codec.MAGIC.decode() in desc


def test_documented_dtypes_are_what_the_encoders_write():
    """x-koala-dtypes.tensors: the server's FrameEncoder (MqttFleet) and the agent's encode_frame defaults."""
    import numpy as np

    doc = {k: v.split()[0] for k, v in DOC["x-koala-dtypes"]["tensors"].items()}
    w = [np.ones((3, 2), np.float32)]
    a = messages.Assignment(1, "dev-1", "cnn_small", teacher_logits=np.ones((4, 10), np.float32),
                            proxy_indices=np.arange(4), weights=w)  # fmt: skip
    _k, header, _b = codec.read_frame_header(codec.FrameEncoder().encode(a))  # as server_app.rounds.fleet
    got = {t["name"].split("/")[0]: t["dtype"] for t in header["tensors"]}
    assert got == {
        "teacher_logits": doc["teacher_logits"],
        "proxy_indices": doc["proxy_indices"],
        "weights": doc["weights"],
    }
    r = messages.Result(1, "dev-1", "cnn_small", 5, proxy_logits=np.ones((4, 10), np.float32), weights=w)
    for dtype in DOC["components"]["messages"]["Assignment"]["x-koala-frame-header"]["properties"]["meta"][
            "properties"]["plan"]["properties"]["logits_dtype"]["enum"]:  # fmt: skip
        _k, header, _b = codec.read_frame_header(codec.encode_frame(r, logits_dtype=dtype))  # as the agent
        got = {t["name"].split("/")[0]: t["dtype"] for t in header["tensors"]}
        assert got == {"proxy_logits": dtype, "weights": doc["weights"]}
        jsonschema.Draft7Validator(MSGS["Result"]["x-koala-frame-header"]).validate(header)
    # int8: value = q x scale, scale = max|x| / 127
    x = np.array([[-2.54, 0.0, 1.27]], np.float32)
    _k, header, body = codec.read_frame_header(codec.encode_frame(
        messages.Result(1, "dev-1", "cnn_small", 5, proxy_logits=x), logits_dtype="int8"))  # fmt: skip
    (t,) = header["tensors"]
    assert t["scale"] == pytest.approx(2.54 / 127)
    assert np.frombuffer(bytes(body), np.int8).tolist() == [-127, 0, 64]
    bad = dict(t)
    del bad["scale"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(MSGS["Result"]["x-koala-frame-header"]).validate(
            {**header, "tensors": [bad]}
        )


def test_limits_match_the_code():
    from server_app import ingest
    from server_app.config import IngestSettings
    from server_app.ingest_budget import Budgets
    from server_app.provisioning.broker_conf import BrokerConf, required_packet_size
    from server_app.transport.broker import DEFAULT_MAX_PACKET

    lim = DOC["x-koala-limits"]
    assert {k: v for k, v in lim["frame"].items() if k != "description"} == {
        "max_frame_bytes": codec.DEFAULT_MAX_FRAME_BYTES, "max_header_bytes": codec.MAX_HEADER_BYTES,
        "max_control_bytes": codec.MAX_CONTROL_BYTES}  # fmt: skip
    assert lim["results_per_round"]["value"] == ingest.MAX_RESULTS_PER_ROUND
    budgets = {k: v for k, v in lim["budgets"].items() if not k.endswith("description")}
    assert budgets == dataclasses.asdict(Budgets())  # every budget documented, with its default
    settings = IngestSettings()
    assert budgets == {k: getattr(settings, k) for k in budgets}  # the [ingest] keys and their defaults
    assert lim["broker"]["max_packet_size"] == required_packet_size()
    assert BrokerConf.__dataclass_fields__["max_packet_size"].default_factory() == required_packet_size()
    assert lim["broker"]["embedded_max_packet_size"] == DEFAULT_MAX_PACKET
    dev_conf = (Path(__file__).parents[2] / "broker_config" / "mosquitto.dev.conf").read_text()
    assert f"max_packet_size {lim['broker']['max_packet_size']}" in dev_conf
    f = lim["fields"]
    assert {k: v for k, v in f.items() if k != "description"} == {
        "max_name_len": messages.MAX_NAME_LEN, "max_text_len": messages.MAX_TEXT_LEN,
        "max_classes": messages.MAX_CLASSES, "max_dict_keys": messages.MAX_DICT_KEYS,
        "max_list_len": messages.MAX_LIST_LEN, "max_participants": messages.MAX_PARTICIPANTS,
        "max_weight_tensors": messages.MAX_WEIGHT_TENSORS, "max_tensor_ndim": messages.MAX_TENSOR_NDIM,
        "max_count": messages.MAX_COUNT, "max_proxy": messages.MAX_PROXY, "max_round_id": topics.MAX_ROUND_ID,
        "max_device_id_len": topics.DEVICE_ID_MAX_LEN, "max_topic_len": f["max_topic_len"],
        "max_predict_rows": messages.MAX_PREDICT_ROWS, "max_predict_values": messages.MAX_PREDICT_VALUES,
    }  # fmt: skip
    with pytest.raises(errors.ContractError) as e:
        topics.parse_topic(f"{topics.PREFIX}/server/" + "s" * (f["max_topic_len"] - len(topics.PREFIX) - 7))
    assert e.value.reason == "bad_topic" and "256" in e.value.detail
    longest = max((b("d" * topics.DEVICE_ID_MAX_LEN) if "device_id" in s.template else b(topics.MAX_ROUND_ID)
                  if "round_id" in s.template else b() for s, b in
                  ((topics.SPECS[k], topics.BUILDERS[k]) for k in topics.SPECS)), key=len)  # fmt: skip
    assert len(longest) <= f["max_topic_len"]
    # the schemas carry the same numbers
    ds = MSGS["DeviceStatus"]["payload"]["properties"]
    assert ds["capabilities"]["maxProperties"] == messages.MAX_DICT_KEYS
    assert ds["capabilities"]["additionalProperties"]["oneOf"][1]["maxItems"] == messages.MAX_LIST_LEN
    assert ds["capabilities"]["additionalProperties"]["oneOf"][0]["maxLength"] == messages.MAX_TEXT_LEN
    assert ds["label_histogram"]["oneOf"][0]["maxItems"] == messages.MAX_CLASSES
    assert ds["num_samples"]["oneOf"][0]["maximum"] == messages.MAX_COUNT
    rs = MSGS["RoundStatus"]["payload"]["properties"]
    assert rs["participants"]["maxItems"] == messages.MAX_PARTICIPANTS
    assert rs["round_id"]["maximum"] == topics.MAX_ROUND_ID
    assert rs["error"]["oneOf"][0]["maxLength"] == messages.MAX_TEXT_LEN
    h = MSGS["Result"]["x-koala-frame-header"]["properties"]
    assert h["weights"]["oneOf"][0]["maximum"] == messages.MAX_WEIGHT_TENSORS
    assert h["tensors"]["items"]["properties"]["shape"]["maxItems"] == messages.MAX_TENSOR_NDIM


def test_client_id_rule():
    from device_firmware_py.config import DeviceConfig

    rule = DOC["x-koala-client-id"]
    assert rule["template"].format(deviceId="dev-1") == topics.device_client_id("dev-1") == "koala-dev-dev-1"
    cfg = DeviceConfig(device_id="dev-1", data_path="d.npz", proxy_path="p.npz", state_dir="state")
    assert cfg.mqtt_client_id == topics.device_client_id("dev-1")  # the agent's default


def test_client_id_is_bound_in_the_provisioned_broker():
    from server_app.provisioning.dynsec import render_dynsec
    from server_app.provisioning.passwords import mosquitto_hash

    doc = json.loads(render_dynsec([("dev-1", mosquitto_hash("s3cret", iterations=1))], []))
    (client,) = [c for c in doc["clients"] if c["username"] == "dev-1"]
    assert client["clientid"] == DOC["x-koala-client-id"]["template"].format(deviceId="dev-1")


def test_last_will_is_documented():
    ch = DOC["channels"]["deviceStatus"]
    will = ch["x-koala-last-will"]
    spec = topics.SPECS["device_status"]
    assert (will["qos"], will["retain"]) == (spec.qos, spec.retained)
    payload = {**will["payload"], "device_id": "dev-1"}
    jsonschema.Draft7Validator(MSGS["DeviceStatus"]["payload"]).validate(payload)
    st = decode(json.dumps(payload).encode(), messages.DeviceStatus)
    assert st.state == "offline" and st.device_id == "dev-1"
    # the reference encoder's Last Will (what the agent registers) validates too, and is not eligible for work
    lwt = json.loads(encode(messages.DeviceStatus("dev-1", "offline")))
    jsonschema.Draft7Validator(MSGS["DeviceStatus"]["payload"]).validate(lwt)
    assert not jsonschema.Draft7Validator(MSGS["DeviceStatus"]["x-koala-work-eligibility"]).is_valid(lwt)


@pytest.mark.parametrize(
    "fields",
    [
        {"arch": "cnn_small", "input_shape": [28, 28, 1], "num_samples": 600, "label_histogram": [60] * 10},
        {"arch": "cnn_small"},  # arch alone is enough
        {"arch": "cnn_small", "num_samples": 0},  # a count without a histogram: taken as before
        {},  # no arch: recorded, never picked
        {"input_shape": [28, 28, 1], "num_samples": 600, "label_histogram": [60] * 10},
        {"arch": "cnn_small", "state": "offline"},
        {
            "arch": "cnn_small",
            "num_samples": 0,
            "label_histogram": [0] * 10,
        },  # empty data set: waits for data
        {"arch": "cnn_small", "label_histogram": [1] * 10},  # a histogram without a count
        {"arch": "mlp_tiny", "num_samples": 1, "label_histogram": [1] + [0] * 9},
    ],
    ids=lambda f: ",".join(f"{k}={v if not isinstance(v, list) else len(v)}" for k, v in f.items()) or "bare",
)
def test_work_eligibility_is_what_the_server_picks(fields):
    """x-koala-work-eligibility holds exactly for the statuses whose device the server can pick:
    server_app.ingest.Presence (online set) + server_app.rounds.fleet.MqttFleet.devices()."""
    from server_app.ingest import Presence
    from server_app.rounds.fleet import MqttFleet

    status = messages.DeviceStatus("dev-1", **fields)
    payload = json.loads(encode(status))
    jsonschema.Draft7Validator(MSGS["DeviceStatus"]["payload"]).validate(payload)  # accepted either way
    presence = Presence()
    presence.update(status)
    fleet = MqttFleet(
        lambda *_a: None, presence.online, None, num_classes=10, proxy_size=1, proxy_digest=None
    )  # type: ignore[arg-type]
    picked = [d.device_id for d in fleet.devices()] == ["dev-1"]
    eligible = jsonschema.Draft7Validator(MSGS["DeviceStatus"]["x-koala-work-eligibility"]).is_valid(payload)
    assert picked == eligible
