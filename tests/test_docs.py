"""The documents a newcomer reads stay true to the code: the README is a short user guide, the
module map names every module that exists (and only those), the documented round and device states
are the code's. (The MQTT contract's own checks: tests/device_firmware_py/test_contract_asyncapi.py.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCH = (REPO / "docs" / "architecture.md").read_text()


def _modules() -> list[str]:
    out = subprocess.run(["git", "ls-files", "server_app/*.py", "device_firmware_py/*.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return [f for f in out if not f.endswith("__init__.py") and "/migrations/" not in f and (REPO / f).is_file()]


def test_readme_is_a_user_guide_under_300_lines() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    for must in ("scripts/demo.sh", "scripts/test.sh", "## What the demo shows", "## Use your models",
                 "production-walkthrough:begin", "## Where to read more"):  # fmt: skip
        assert must in readme, must


def test_module_map_names_every_module() -> None:
    missing = [f for f in _modules() if Path(f).stem not in ARCH]
    assert not missing, f"docs/architecture.md does not mention: {missing}"


def test_module_map_names_no_module_that_is_gone() -> None:
    """Every `name.py` the map mentions exists somewhere in the product packages (or tests/bench)."""
    names = set(re.findall(r"\b([a-z_][a-z0-9_]*)\.py\b", ARCH))
    have = {Path(f).stem for f in subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True,
                                                  text=True, check=True).stdout.split()}  # fmt: skip
    assert not sorted(names - have), sorted(names - have)


def test_documented_round_states_are_the_codes() -> None:
    from device_firmware_py.contract.messages import ROUND_STATES

    text = (REPO / "docs" / "monitoring.md").read_text() + ARCH + (REPO / "docs" / "getting-started.md").read_text()
    for state in ROUND_STATES:
        assert state in text, state
    assert "distilling" not in ARCH and "distilling" not in (REPO / "device_firmware_py/contract/asyncapi.yaml").read_text()
