"""The layers of the code base, read from the imports (ast) of every module: nothing imports upwards.

    device_firmware_py  <-  server_app  <-  bench  <-  research

device_firmware_py imports nothing of server_app, bench or research; server_app nothing of bench or
research; bench nothing of research (research may import all three). Imports inside functions count
too, and so do `importlib.import_module("...")` / `__import__("...")` calls with a literal name and
"module:attr" plug-in references in string constants of the form `pkg.mod:Attr`.

One sanctioned exception, listed in ALLOWED: `koala bench` (server_app/commands/bench.py) loads the
bench package with importlib inside its run(), as a command runs a plug-in; no other module of
server_app names bench, and none imports it at import time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("device_firmware_py", "server_app", "bench", "research")  # bottom to top
FORBIDDEN = {low: set(LAYERS[i + 1:]) for i, low in enumerate(LAYERS)}
ALLOWED = {"server_app/commands/bench.py": {"bench"}}  # the `koala bench` command runs the benchmarks
_REF = re.compile(r"^([A-Za-z_][\w.]*):[A-Za-z_]\w*$")  # "module:attr" (plugins.load_ref)


def imported(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports; relative ones stay inside it)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            names.add(node.args[0].value.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := _REF.match(node.value)):
            names.add(m.group(1).split(".")[0])
    return names


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "results" not in p.relative_to(ROOT).parts)


@pytest.mark.parametrize("package", LAYERS)
def test_no_upward_imports(package: str) -> None:
    files = modules(package)
    if package != "research":
        assert files, f"{package}/ has no modules"
    rel = {p: str(p.relative_to(ROOT)) for p in files}
    bad = {rel[p]: sorted(imported(p) & FORBIDDEN[package] - ALLOWED.get(rel[p], set())) for p in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_the_checker_sees_imports_of_every_kind(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import a.b\nfrom c.d import e\nfrom . import g\n"
                 "def h():\n    import importlib\n    importlib.import_module('i.j')\n    __import__('k')\n"
                 "REF = 'l.m:Attr'\n")
    assert imported(f) == {"a", "c", "importlib", "i", "k", "l"}


def test_the_wheel_ships_bench_and_not_research() -> None:
    """`koala bench` runs from an installed wheel: pyproject's package list takes bench (the product's
    benchmarks), never research/ or the results folders."""
    from setuptools import find_packages

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(str(ROOT), include=include))
    assert {"bench", "server_app", "device_firmware_py"} <= shipped
    assert not {p for p in shipped if p.split(".")[0] in ("research", "tests") or "results" in p.split(".")}, shipped
