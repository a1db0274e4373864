"""The REAL agent's and the REAL server's messages validate against asyncapi.yaml.

One round of koala_homo between a DeviceAgent (in a thread) and ServerServices on a private
Mosquitto, with a sniffer subscribed to koala/v1/#: every message either side published is checked
against the document -- JSON control messages against the payload schema of their channel, binary
frames' prefix against the documented layout and their header against x-koala-frame-header, the
agent's online status against x-koala-work-eligibility, tensor dtypes against x-koala-dtypes,
delivered QoS and retained flags against the channel's binding, the agent's client id and Last
Will against x-koala-client-id and x-koala-last-will. A field the agent starts sending, a state
the server starts publishing or a dtype that changes without the document fails here.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as paho
import pytest
import yaml

from device_firmware_py.contract import codec, topics

pytestmark = pytest.mark.mosquitto
DOC = yaml.safe_load((Path(codec.__file__).parent / "asyncapi.yaml").read_text())
MSGS = DOC["components"]["messages"]
CHANNELS = {c["x-koala-kind"]: (name, c) for name, c in DOC["channels"].items()}
DEV = "dev000"


def _binding(kind: str) -> dict[str, Any]:
    name, _ch = CHANNELS[kind]
    (op,) = [o for o in DOC["operations"].values() if o["channel"]["$ref"] == f"#/channels/{name}"]
    return op["bindings"]["mqtt"]


def _schema(kind: str) -> dict[str, Any]:
    _name, ch = CHANNELS[kind]
    (ref,) = [m["$ref"] for m in ch["messages"].values()]
    return MSGS[ref.rsplit("/", 1)[1]]


class Sniffer:
    """A plain paho client on koala/v1/# at QoS 1: keeps (topic, payload, delivered qos, retain)."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.got: list[tuple[str, bytes, int, bool]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name, clean_session=True)
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, *_a: c.subscribe(topics.filter_everything(), 1)
        self.c.connect(host, port)
        self.c.loop_start()

    def _on_message(self, _c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload), m.qos, bool(m.retain)))

    def messages(self) -> list[tuple[str, bytes, int, bool]]:
        with self.lock:
            return list(self.got)

    def stop(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _wait(pred: Any, timeout_s: float, what: str) -> None:
    t_end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def check_against_document(topic: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    """(kind, decoded JSON object or frame header) of one delivered message, validated against the
    document; raises on any mismatch."""
    kind = topics.parse_topic(topic).kind
    schema = _schema(kind)
    if schema["contentType"] == "application/json":
        obj = json.loads(payload)
        jsonschema.Draft7Validator(schema["payload"]).validate(obj)
        return kind, obj
    assert schema["contentType"] == "application/octet-stream"
    # the prefix exactly as the document's payload description spells it
    magic, version, kind_id, reserved, hlen = struct.unpack_from(">4sBBHI", payload, 0)
    assert (magic, version, reserved) == (b"KOAL", 2, 0), (magic, version, reserved)
    assert kind_id == schema["x-koala-frame-kind"]
    assert hlen <= DOC["x-koala-limits"]["frame"]["max_header_bytes"]
    assert len(payload) <= DOC["x-koala-limits"]["frame"]["max_frame_bytes"]
    header = json.loads(payload[12 : 12 + hlen].decode("utf-8"))
    jsonschema.Draft7Validator(schema["x-koala-frame-header"]).validate(header)
    body = payload[12 + hlen :]
    assert len(body) == header["body_len"] and hashlib.sha256(body).hexdigest() == header["body_sha256"]
    itemsize = {"float32": 4, "float16": 2, "int8": 1, "int32": 4}
    assert set(itemsize) == set(DOC["x-koala-dtypes"]["wire"])
    nbytes = 0
    for t in header["tensors"]:
        n = 1
        for d in t["shape"]:
            n *= d
        nbytes += n * itemsize[t["dtype"]]
    assert nbytes == len(body), "the body is the tensors concatenated in header order"
    return kind, header


def test_a_real_round_speaks_only_the_documented_contract(tmp_path, mosquitto_broker):
    from device_firmware_py.agent.agent import DeviceAgent
    from device_firmware_py.config import DeviceConfig
    from server_app.demo.fleet_data import prepare_fleet
    from server_app.registry import crud
    from server_app.services import ServerOptions, ServerServices

    b = mosquitto_broker
    layout = prepare_fleet(tmp_path, dataset="digits", devices=1, proxy_size=64, broker_url=b.url,
                           device_overrides={"quantize": False})  # fmt: skip
    sniffer = Sniffer(b.host, b.port, "contract-sniffer")
    opts = dict(db_url=f"sqlite:///{tmp_path / 'koala.db'}", data_dir=str(tmp_path / "server"),
                proxy_path=layout.proxy_path, test_path=layout.test_path, broker_host=b.host, broker_port=b.port,
                policy={"strategy": "koala_homo", "teacher": "device_logits", "rkd_epochs": 1,
                        "large": {"width": 8, "options": {"fc": 64}}, "rounds": 1, "deadline_s": 120.0,
                        "min_devices": 1, "quorum_fraction": 1.0},
                eval_samples=100, torch_threads=1)  # fmt: skip
    agent = DeviceAgent(DeviceConfig.load(layout.devices[0]["config_path"]))
    thread = threading.Thread(target=agent.run, daemon=True)
    server = ServerServices(ServerOptions(**opts))
    try:
        thread.start()
        _wait(lambda: agent._client is not None and agent._client.connect_count > 0, 60, "agent connected")
        # the client id rule and the Last Will, as the agent's MQTT client carries them
        paho_client = agent._client.client
        assert agent._client.client_id == DOC["x-koala-client-id"]["template"].format(deviceId=DEV)
        will = DOC["channels"][CHANNELS["device_status"][0]]["x-koala-last-will"]
        assert paho_client._will and paho_client._will_topic.decode() == topics.device_status(DEV)
        assert (paho_client._will_qos, paho_client._will_retain) == (will["qos"], will["retain"])
        kind, lwt = check_against_document(topics.device_status(DEV), paho_client._will_payload)
        assert {k: lwt[k] for k in will["payload"]} == {**will["payload"], "device_id": DEV}

        server.start()
        assert server.orchestrator.wait_finished(240), server.orchestrator.state
        assert server.registry.run(crud.get_round, 0).state == "completed"
        _wait(lambda: any(t == topics.device_verdict(DEV) for t, *_ in sniffer.messages()), 30, "verdict")
    finally:
        agent.stop()
        thread.join(30)
        if server.started:
            server.stop()
    time.sleep(0.5)  # the agent's clean-exit offline status and the server's last round status
    sniffer.stop()

    seen: dict[str, list[dict[str, Any]]] = {}
    for topic, payload, qos, _retain in sniffer.messages():
        if not payload:  # a cleared retained message
            continue
        if any(re.fullmatch(t["pattern"], topic) for t in DOC["x-koala-internal-topics"]):
            assert topic.startswith(f"{topics.PREFIX}/server/") and topic != topics.server_status()
            continue  # the server's own probes (documented as such)
        kind, obj = check_against_document(topic, payload)
        # delivered at min(publish QoS, 1): what the device / server published with
        assert qos == min(_binding(kind)["qos"], 1), (kind, qos)
        seen.setdefault(kind, []).append(obj)

    # both directions of a whole round went through the checks above
    assert {"device_status", "progress", "result", "assign", "verdict", "round_status", "round_current",
            "server_status"} <= set(seen), sorted(seen)  # fmt: skip

    # the agent's online status is one the server gives work to, as the document says
    eligibility = MSGS["DeviceStatus"]["x-koala-work-eligibility"]
    online = [s for s in seen["device_status"] if s["state"] == "online"]
    assert online and all(s["device_id"] == DEV for s in seen["device_status"])
    for s in online:
        jsonschema.Draft7Validator(eligibility).validate(s)
    assert seen["device_status"][-1]["state"] == "offline"  # clean exit

    # dtypes on the wire are the documented ones
    dtypes = DOC["x-koala-dtypes"]["tensors"]
    (assign,) = seen["assign"]
    plan = assign["meta"]["plan"]
    for t in assign["tensors"]:
        name = "weights" if t["name"].startswith("weights/") else t["name"]
        assert dtypes[name].split()[0] == t["dtype"], t
    for res in seen["result"]:
        for t in res["tensors"]:
            if t["name"] == "proxy_logits":
                assert t["dtype"] == plan["logits_dtype"]
                assert t["dtype"] in MSGS["Assignment"]["x-koala-frame-header"]["properties"]["meta"]["properties"][
                    "plan"]["properties"]["logits_dtype"]["enum"]  # fmt: skip
            else:
                assert t["name"].startswith("weights/") and t["dtype"] == dtypes["weights"].split()[0]
    assert [v["status"] for v in seen["verdict"]] == ["accepted"]
    assert {s["state"] for s in seen["round_status"]} <= set(
        MSGS["RoundStatus"]["payload"]["properties"]["state"]["enum"])  # fmt: skip

    # what is retained on the broker now is exactly on the channels documented as retained
    late = Sniffer(b.host, b.port, "contract-retained")
    time.sleep(1.0)
    late.stop()
    retained = {topics.parse_topic(t).kind for t, p, _q, r in late.messages() if r and p}
    assert {"device_status", "server_status", "round_status"} <= retained, retained
    assert all(_binding(k)["retain"] for k in retained), retained
