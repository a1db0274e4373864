"""Tests of research/ (experiments, candidate strategies, probes): marked `research`, so CI (addopts
`-m 'not slow and not research'`) does not run them; `pytest -m research tests/research` does."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.research)
