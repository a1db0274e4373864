"""ResultSpill: a collecting round's accepted tensors on disk, not in the orchestrator's heap.

Why: a round holds every accepted result until aggregation. At 10,000 devices of 5,000 x 10
float16 logits that was ~1 GB of heap (`koala bench fleet_scale`: 0.095 of the 0.168 MiB per
device), and glibc seldom gives such memory back. Here each accepted result's tensors are
appended to one file in the server's data directory (`engine.tensor_file.TensorFile`) as they
arrive and dropped from memory; the result keeps its small fields (device, arch, counts,
histogram, metrics). When the collection closes, `attach` maps the file once, read-only, and
gives each result views into it: the strategies see ordinary numpy arrays (a write raises: they
compute on copies), what they read is page cache the kernel can reclaim, and the streaming
consumers hand the pages back as they finish with them (`engine.pages.release_pages`). The file
is unlinked once mapped; a server that dies mid-round leaves its file behind, which the next
leading server deletes when it starts (`clear_stale`); a resumed round reloads its results from
the payload store.

Logits are kept as float16 (what devices send; see `engine.types.hold_logits`), weights as sent.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from device_firmware_py.contract.messages import Result
from server_app.engine.tensor_file import Slot, TensorFile


class ResultSpill:
    """One round's tensors. `put(result)` writes and strips; `attach(results)`; `close()`."""

    def __init__(self, path: str | Path):
        self._file = TensorFile(path)
        self._lock = threading.Lock()
        # device id -> (logits slot or None, weight slots or None); a round has one result per device
        self._slots: dict[str, tuple[Slot | None, list[Slot] | None]] = {}

    @property
    def nbytes(self) -> int:
        return self._file.nbytes

    def put(self, r: Result) -> Result:
        """Write `r`'s tensors (logits as float16) and drop them from `r`; returns `r`. Once per
        device (the collection keeps the first accepted result of each)."""
        with self._lock:
            if r.device_id in self._slots:
                raise ValueError(f"{r.device_id} already spilled this round")
            logits = None if r.proxy_logits is None else self._file.append(np.asarray(r.proxy_logits, np.float16))
            weights = None if r.weights is None else [self._file.append(np.asarray(w)) for w in r.weights]
            self._slots[r.device_id] = (logits, weights)
        r.proxy_logits, r.weights = None, None
        return r

    def attach(self, results: list[Result]) -> None:
        """Give every spilled result in `results` its tensors back as read-only views of the file
        (one mapping for the round); the file is unlinked."""
        with self._lock:
            self._file.map()
            for r in results:
                slots = self._slots.get(r.device_id)
                if slots is None:
                    continue
                logits, weights = slots
                if logits is not None:
                    r.proxy_logits = self._file.view(logits)
                if weights is not None:
                    r.weights = [self._file.view(s) for s in weights]
            self._slots.clear()

    def close(self) -> None:
        """Discard the spill (round aborted or failed); views already attached stay valid."""
        with self._lock:
            self._slots.clear()
            self._file.close()


def clear_stale(spill_dir: str | Path) -> int:
    """Delete spill files of an earlier leading server (called by a server once it leads: nobody
    else writes there then). Returns how many were removed."""
    n = 0
    for f in Path(spill_dir).glob("*.tensors"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            n += 1
    return n
