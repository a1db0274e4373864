"""Shared plumbing of the benchmarks: result files, machine facts, tables, child processes.

Why here: every result JSON must carry the same provenance (date, git sha, machine, load average)
so numbers taken on a busy 2-core box can be told apart from numbers taken on a quiet one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# A source checkout, or bench installed from the wheel (REPO is then site-packages): results go to
# ./koala-bench-results there, and the few steps that install the project from its source say so.
CHECKOUT = (REPO / "pyproject.toml").is_file() and (REPO / "bench" / "__init__.py").is_file()
DEFAULT_OUT = REPO / "bench" / "results" if CHECKOUT else Path.cwd() / "koala-bench-results"
CHECKOUT_HINT = "git clone the koala-edge repository && scripts/setup.sh, then run it from the checkout"


def require_checkout(what: str) -> None:
    """Raise a one-line error when `what` needs the source tree and bench runs from an installed wheel."""
    if not CHECKOUT:
        raise RuntimeError(f"{what} needs a source checkout (it installs the project from its source tree): {CHECKOUT_HINT}")
PG_ADMIN_URL = os.environ.get("KOALA_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def git_sha() -> str | None:
    if not CHECKOUT:  # installed: REPO is site-packages (maybe inside some other repository's venv)
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return sha + ("-dirty" if dirty else "") if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """What the numbers depend on: CPU count, model, memory, load average at measurement time."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    with suppress(ValueError, OSError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_gib": mem_gib,
        "ulimit_nofile": [soft, hard],
        "loadavg": list(os.getloadavg()),
    }


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """VmHWM (peak resident set) of a process from /proc, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib(pid: int | str = "self") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def write_result(name: str, out: Path, *, quick: bool, params: dict[str, Any], raw: Any, ratios: dict[str, Any],
                 notes: Sequence[str] = (), started: float, load_start: Sequence[float],
                 rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """bench/results/<name>.json (or <name>.quick.json): provenance + parameters + raw + ratios
    (+ `rows`: one summary object per measured setting, where a benchmark has them)."""
    doc = {
        "benchmark": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "quick": quick,
        "command": f"koala bench {name}" + (" --quick" if quick else ""),
        "wall_s": round(time.time() - started, 2),
        "machine": {**machine(), "loadavg_start": list(load_start)},
        "params": params,
        "raw": raw,
        "ratios": ratios,
        "notes": list(notes),
        **({"rows": rows} if rows is not None else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{name}.quick.json" if quick else f"{name}.json")
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    doc["path"] = str(path)
    return doc


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (printed, and pasted into docs/benchmarks.md as is)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda cs: "| " + " | ".join(c.ljust(w) for c, w in zip(cs, widths, strict=True)) + " |"  # noqa: E731
    out = [line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def python_child(module: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    """`python -m bench.<module> ...` with the repo (or the installed bench's site-packages) on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True, **popen)


@contextmanager
def pg_database(prefix: str = "koala_bench") -> Iterator[str | None]:
    """A fresh PostgreSQL database (dropped afterwards) as a SQLAlchemy URL; None when unreachable."""
    from server_app.registry.scratch import ScratchUnavailable, scratch_postgres

    with ExitStack() as stack:
        try:
            url: str | None = stack.enter_context(scratch_postgres(PG_ADMIN_URL, prefix))
        except ScratchUnavailable:
            url = None
        yield url
