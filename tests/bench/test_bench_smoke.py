"""Every benchmark runs in --quick mode and writes a valid result JSON (no timing assertions).

The full benchmarks are not run in CI (they take minutes and their numbers depend on the machine);
`-m slow` runs `koala bench all` once for whoever wants the real numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server_app.cli import main

NAMES = ("ingestion", "fleet_scale", "device_footprint", "communication", "reverse_kd", "device_install")
needs_mosquitto = pytest.mark.skipif(
    not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()), reason="needs the mosquitto binary"
)


def _check(doc: dict, name: str) -> None:
    assert doc["benchmark"] == name
    assert doc["quick"] is True
    for key in ("date", "git_sha", "machine", "params", "raw", "ratios"):
        assert key in doc, key
    assert len(doc["machine"]["loadavg"]) == 3
    assert doc["ratios"], "every benchmark reports ratios against its same-run baseline"


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.mosquitto, needs_mosquitto]) if n in ("ingestion", "fleet_scale") else n
     for n in NAMES],
)  # fmt: skip
def test_quick_benchmark_writes_valid_json(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", name, "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / f"{name}.quick.json").read_text())
    _check(doc, name)
    assert "|" in capsys.readouterr().out  # a table was printed
    if name == "ingestion":  # nothing lost; the server paths validated and persisted every message
        for r in doc["raw"]["runs"]:
            assert r["received"] == r["messages"], r
            if r["path"] != "raw broker":
                assert r["persisted"] == r["messages"]
                assert r["ingestor_counts"].get("accepted") == r["messages"]


@pytest.mark.slow
def test_full_benchmarks(tmp_path: Path) -> None:
    assert main(["bench", "all", "--out", str(tmp_path)]) == 0
    for n in NAMES:
        _check({**json.loads((tmp_path / f"{n}.json").read_text()), "quick": True}, n)
