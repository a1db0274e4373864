"""Subcommands of `koala` (see server_app.cli for the module convention)."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

STOPPING = "stopping (Ctrl-C again to force)..."


def announce_stop(prog: str = "koala") -> None:
    """One line on stderr, written at once (os.write: safe inside a signal handler)."""
    with contextlib.suppress(OSError):
        os.write(2, f"\n{prog}: {STOPPING}\n".encode())


def stop_on_signals(prog: str | None = None) -> None:
    """Make Ctrl-C and SIGTERM raise KeyboardInterrupt, so long-running commands clean up (stop
    child processes, disconnect) in their `finally`. Also when started with SIGINT ignored: a
    background job of a non-interactive shell (`cmd &` in a script, CI runners) inherits SIG_IGN
    and Python then installs no KeyboardInterrupt handler; SIGTERM by default kills without cleanup.

    The first signal says "stopping (Ctrl-C again to force)..." right away (the clean stop of a demo
    takes up to tens of seconds: agents, server, broker); a second one exits at once (status 130)."""
    name = prog or "koala"
    seen = {"n": 0}

    def handler(signum: int, frame: Any) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            announce_stop(name.strip())
            raise KeyboardInterrupt
        try:
            os.write(2, b"forced stop\n")
        finally:
            os._exit(130)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


_PYDANTIC_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def describe_validation(exc: Any, args: Any = None, flags: dict[str, str] | None = None, source: str = "") -> str:
    """A pydantic ValidationError as lines that name what the user typed: "--rounds -1: must be >= 1"
    for a field a flag set (`flags` maps field -> flag where the names differ: deadline_s ->
    --round-timeout), else "policy field local_epochs: ..." (+ the file it came from)."""
    lines = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ())]
        field = loc[-1] if loc else "?"
        ctx = e.get("ctx") or {}
        op = _PYDANTIC_BOUNDS.get(e.get("type", ""))
        why = f"must be {op} {next(iter(ctx.values()))}" if op and ctx else str(e.get("msg", "invalid"))
        flag = (flags or {}).get(field) or "--" + field.replace("_", "-")
        dest = flag.lstrip("-").replace("-", "_")
        if args is not None and getattr(args, dest, None) is not None:
            lines.append(f"{flag} {getattr(args, dest)}: {why}")
        else:
            where = f" (in {source})" if source else ""
            lines.append(f"policy field {'.'.join(loc) or field} = {e.get('input')!r}: {why}{where}")
    return "\n".join(lines)
