"""Crash-safe file writes, shared by the device agent, the LiteRT runtime and the server.

Why one helper: a device can lose power at any instant and the server can be SIGKILLed mid-round;
a model, round state or accepted submission must then be either the old file or the new one,
never half of each. Write to a temp file in the same directory, fsync it, `os.replace` it over the
target (atomic on POSIX), so readers never see a torn file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Replace `path` with `data` (bytes, or a function writing into the open binary file) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
