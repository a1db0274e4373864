"""The spool directory: an application that cannot speak HTTP drops labeled samples as files.

Protocol (docs/device-serving.md): write `NAME.npz` holding `x` (float [N, H, W, C]) and `y`
(int [N]) under a temporary name -- a leading dot or a `.tmp` suffix, both ignored -- then
rename it to `NAME.npz` (atomic on one file system), so the agent never reads half a file. The agent
looks every `spool_poll_s` seconds and moves each file to `accepted/` or to `rejected/` next to a
`NAME.npz.reason.txt` that says why (the same message the endpoint would answer). Nothing is
stored from a rejected file. Each folder keeps the newest `spool_keep` files (by mtime): the
store, not the spool, is where samples live.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.serving.sample_store import SampleError, SampleStore

log = logging.getLogger("koala.device.spool")


def scan_spool(spool_dir: str | Path, store: SampleStore, keep: int = 100) -> list[dict[str, Any]]:
    """Take every finished `*.npz` in `spool_dir` into `store`; returns one record per file."""
    spool = Path(spool_dir)
    if not spool.is_dir():
        spool.mkdir(parents=True, exist_ok=True)
        return []
    done: list[dict[str, Any]] = []
    for path in sorted(spool.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name) if p.exists() else (0, p.name)):
        if not path.is_file() or path.name.startswith(".") or path.suffix != ".npz":
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("x", "y") if k not in z.files]
                if missing:
                    raise SampleError(f"the .npz lacks {missing} (has {z.files})")
                x, y = np.asarray(z["x"]), np.asarray(z["y"])
            res = store.add(x, y)
            _move(path, spool / "accepted", None, keep)
            done.append({"file": path.name, "ok": True, **res})
            log.info("spool file accepted file=%s samples=%d stored=%d", path.name, res["accepted"], res["num_samples"])
        except (SampleError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            reason = str(exc) if isinstance(exc, SampleError) else f"not a readable .npz: {exc}"
            _move(path, spool / "rejected", reason, keep)
            done.append({"file": path.name, "ok": False, "reason": reason})
            log.warning("spool file rejected file=%s reason=%s", path.name, reason)
    return done


def _move(path: Path, folder: Path, reason: str | None, keep: int) -> None:
    folder.mkdir(exist_ok=True)
    dst = folder / path.name
    if reason is not None:
        (folder / f"{path.name}.reason.txt").write_text(reason + "\n")
    os.replace(path, dst)
    if keep >= 0:
        files = sorted((p for p in folder.iterdir() if p.suffix == ".npz"), key=lambda p: p.stat().st_mtime_ns)
        for old in files[: max(0, len(files) - keep)]:
            old.unlink(missing_ok=True)
            (folder / f"{old.name}.reason.txt").unlink(missing_ok=True)
