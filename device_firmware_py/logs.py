"""Log setup for every KOALA process: human text (default) or JSON lines for log shippers.

Why JSON: a fleet's logs end up in Loki/Elasticsearch/journald; one JSON object per line with
`ts`, `level`, `logger`, `msg` and the message's `key=value` pairs as fields (our log calls are
written as `event key=value ...`) is searchable without regexes. Stdlib only: the device imports it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_KV = re.compile(r"(?<![\w.])([a-z_][a-z0-9_.]*)=(\"[^\"]*\"|'[^']*'|[^\s,;]+)")
_RESERVED = {"ts", "level", "logger", "msg", "exc"}


def fields_of(message: str) -> dict[str, Any]:
    """`key=value` pairs of a log message, values as int/float when they read as numbers."""
    out: dict[str, Any] = {}
    for k, v in _KV.findall(message):
        if k in _RESERVED:
            k = f"{k}_"
        v = v.strip("\"'")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (RFC 3339 UTC), level, logger, msg, static and parsed fields."""

    def __init__(self, static: dict[str, Any] | None = None):
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        doc: dict[str, Any] = {"ts": ts, "level": record.levelname, "logger": record.name, "msg": msg}
        doc.update(self.static)
        for k, v in fields_of(msg).items():
            doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


def configure_logging(level: str = "INFO", fmt: str = "text", static: dict[str, Any] | None = None) -> None:
    """Root logger to stderr in `fmt` (text | json); replaces handlers set before (idempotent).
    `static` fields (e.g. device=...) go on every line."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} not in {FORMATS}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(static))
    else:
        prefix = "".join(f"{k}={v} " for k, v in (static or {}).items())
        handler.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(message)s", prefix + "%(message)s")))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


def json_native_stderr() -> Callable[[], None]:
    """Keep a JSON log JSON when native code writes to the process's stderr directly.

    Why: LiteRT prints `INFO: Created TensorFlow Lite XNNPACK delegate for CPU.` (and native
    libraries other notices) straight to file descriptor 2, past Python's logging, and no setting
    turns it off; in a `log_format = json` process that one line broke "one JSON object per line"
    for log shippers. Here fd 2 becomes a pipe; a thread passes JSON lines through unchanged and
    wraps any other line as {"logger": "native", ...}. Returns `restore()`, which puts fd 2 back and
    drains the pipe (also registered with atexit, so lines written just before exit are kept)."""
    import atexit
    import os
    import threading

    sys.stderr.flush()
    original = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    out = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace")

    def pump() -> None:
        with os.fdopen(r, "r", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                text = line.rstrip("\n")
                if text.lstrip().startswith("{"):
                    out.write(text + "\n")
                elif text.strip():
                    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
                    out.write(json.dumps({"ts": ts, "level": "INFO", "logger": "native", "msg": text.strip()}) + "\n")

    thread = threading.Thread(target=pump, name="koala-native-stderr", daemon=True)
    thread.start()
    done = [False]

    def restore() -> None:
        if done[0]:
            return
        done[0] = True
        sys.stderr.flush()
        os.dup2(out.fileno(), 2)  # the pipe's last writer is gone: the pump reads to EOF and stops
        thread.join(2.0)

    atexit.register(restore)
    return restore
