"""`<run dir>/run.json`: where a running `koala demo` can be reached, for the other CLIs.

The demo writes it once its server is up (API URL, broker URL, token file, database URL, run dir,
pid, state "running") and marks it "stopped" when it stops. `koala rounds|devices|models|monitor
--run-dir DIR` read it, so nobody guesses ports; without --api / --broker (and no KOALA_* URL) they
use the newest *live* demo under ./demo_runs (and say so on stderr). Stdlib only: the operator
commands import it before anything heavy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
RUNS_DIR = "demo_runs"  # = launcher.RUNS_DIR (the launcher imports the server; this module must not)


def write_run_file(run_dir: Path, **fields: Any) -> Path:
    doc = {"state": "running", "pid": os.getpid(), "run_dir": str(run_dir),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}  # fmt: skip
    return _write(Path(run_dir) / RUN_FILE, doc)


def _write(path: Path, doc: dict[str, Any]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def mark_stopped(run_dir: Path) -> None:
    path = Path(run_dir) / RUN_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    doc.update(state="stopped", stopped=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write(path, doc)


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def read_run_file(run_dir: str | Path) -> dict[str, Any]:
    """The run's record; state is "stopped" also when its process is gone (killed). Raises
    CommandError naming the file when there is none."""
    from device_firmware_py.cli import CommandError

    d = Path(run_dir)
    path = d / RUN_FILE
    try:
        doc = json.loads(path.read_text())
    except OSError:
        raise CommandError(f"no {RUN_FILE} in {d}: not the directory of a `koala demo` run\n"
                           f"  the demo prints its run dir first (ls {RUNS_DIR}/)") from None  # fmt: skip
    except ValueError as exc:
        raise CommandError(f"{path}: not JSON ({exc})") from None
    if doc.get("state") == "running" and not _alive(doc.get("pid")):
        doc["state"] = "stopped"
    doc["run_dir"] = str(d)
    return doc


def live_run(base: str | Path = RUNS_DIR) -> dict[str, Any] | None:
    """The newest run under `base` whose demo is still running, or None."""
    root = Path(base)
    if not root.is_dir():
        return None
    files = sorted(root.glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for f in files:
        try:
            doc = read_run_file(f.parent)
        except Exception:  # noqa: BLE001 - a broken file is skipped here; --run-dir reports it
            continue
        if doc.get("state") == "running":
            return doc
    return None


def require_live(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` when its demo is running; else CommandError saying how to read its results offline."""
    from device_firmware_py.cli import CommandError

    if doc.get("state") == "running":
        return doc
    d = doc["run_dir"]
    raise CommandError(f"the demo in {d} has stopped{' (' + doc['stopped'] + ')' if doc.get('stopped') else ''}: "
                       f"nothing serves {doc.get('api_url') or 'its API'} any more\n"
                       f"  read it offline: koala models ls --data-dir {d}/server; results in {d}/results.json; "
                       "(`koala demo --keep-serving` keeps a demo's server up until Ctrl-C)")  # fmt: skip
