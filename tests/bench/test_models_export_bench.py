"""bench/models_export.py: a quick run, and its results file keeps the other benchmarks' sections."""

from __future__ import annotations

import json

import pytest


def test_write_section_keeps_other_sections(tmp_path):
    from bench.models_export import write_section

    p = tmp_path / "models_at_work.json"
    p.write_text(json.dumps({"device_predict": {"p50_ms": 1.0}, "export": {"old": True}}))
    write_section({"new": 1}, p)
    assert json.loads(p.read_text()) == {"device_predict": {"p50_ms": 1.0}, "export": {"new": 1}}


@pytest.mark.slow
def test_quick_run(tmp_path):
    from bench.models_export import main

    out = tmp_path / "r.json"
    assert main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["export"]
    for fmt in ("safetensors", "pt", "torchscript", "onnx"):
        assert res["formats"][fmt]["argmax_agreement"] >= 0.999
    assert res["small"]["tflite_float"]["argmax_agreement"] >= 0.999
