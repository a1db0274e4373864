"""Structured logs (device_firmware_py.logs): text by default, JSON lines with key=value fields."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from device_firmware_py.logs import configure_logging, fields_of


def test_fields_of_reads_key_value_pairs_with_numbers():
    f = fields_of("accepted round=3 device=dev-001 bytes=20690 acc=0.75 url=mqtt://h:1883 reason='bad shape'")
    assert f == {"round": 3, "device": "dev-001", "bytes": 20690, "acc": 0.75, "url": "mqtt://h:1883",
                 "reason": "bad shape"}  # fmt: skip
    assert fields_of("no pairs here") == {}
    assert fields_of("level=x msg=y") == {"level_": "x", "msg_": "y"}  # never overwrite the record's own keys


def _run(fmt: str) -> list[str]:
    code = (
        "import logging; from device_firmware_py.logs import configure_logging;"
        f"configure_logging('INFO', {fmt!r}, static={{'device': 'dev7'}});"
        "log = logging.getLogger('koala.agent');"
        "log.info('published round=%d bytes=%d', 4, 20690); log.debug('hidden');"
        "\ntry:\n 1/0\nexcept ZeroDivisionError:\n log.exception('boom step=%d', 2)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return [ln for ln in out.stderr.splitlines() if ln.strip()]


def test_json_lines_carry_fields_and_exceptions():
    lines = _run("json")
    docs = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert len(docs) == 2  # DEBUG filtered; the traceback stays inside its record
    assert docs[0]["logger"] == "koala.agent" and docs[0]["level"] == "INFO"
    assert docs[0]["round"] == 4 and docs[0]["bytes"] == 20690 and docs[0]["device"] == "dev7"
    assert docs[0]["ts"].endswith("Z")
    assert "ZeroDivisionError" in docs[1]["exc"] and docs[1]["step"] == 2


def test_text_is_the_default_and_names_the_device():
    lines = _run("text")
    assert "INFO koala.agent device=dev7 published round=4 bytes=20690" in lines[0]


def test_unknown_format_is_an_error():
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml")


def test_native_stderr_lines_become_json_objects() -> None:
    """`koala serve` with log_format json: a line native code writes to fd 2 directly (LiteRT's
    XNNPACK notice) comes out as a JSON object like every log record, none is lost at exit."""
    import json
    import subprocess
    import sys

    code = (
        "import logging, os\n"
        "from device_firmware_py.logs import configure_logging, json_native_stderr\n"
        "configure_logging('INFO', 'json')\n"
        "json_native_stderr()\n"
        "logging.getLogger('koala.x').info('before')\n"
        "os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
        "logging.getLogger('koala.x').info('last words')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    docs = [json.loads(ln) for ln in out.stderr.splitlines() if ln.strip()]
    assert [d["msg"] for d in docs] == ["before", "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", "last words"]
    assert docs[1]["logger"] == "native"
