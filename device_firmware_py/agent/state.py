"""The agent's on-disk state, so a restarted (or power-cycled) device resumes where it was.

Layout of `state_dir`:
  model.npz           small-model weights (SmallModel.save_state, atomic)
  round.json          {"round_id", "phase": "assigned" | "done", "model_version", "confirmed", ...}
  assignment.bin      the raw assignment frame being worked on (redo it after a crash)
  result.bin          the encoded result frame of the finished round (re-publish until the
                      round closes: the server's ingestion is idempotent)
  model_int8.tflite   the int8 inference model the device serves with
  modules.json        modules loaded by this process (proves no torch/tensorflow on the device)
  cache/              .npy copies of the .npz data members, memory-mapped by the agent (datafiles)
  samples/            samples.npz: the on-device sample store (data_source = store; serving.sample_store)
  agent.sock          the local endpoint for applications (serving.local_api; unless serve_socket says otherwise)

Every file is written tmp + fsync + os.replace: a crash leaves the old or the new file, never half.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from device_firmware_py.fileio import atomic_write

PHASE_ASSIGNED = "assigned"
PHASE_DONE = "done"


@dataclass
class RoundState:
    round_id: int
    phase: str  # PHASE_ASSIGNED | PHASE_DONE
    model_version: int = 0
    rounds_done: int = 0
    # The server's verdict said it holds this round's result (accepted, or a duplicate of what it
    # accepted): reconnects stop re-publishing it. Only a repeated assignment asks for it again.
    confirmed: bool = False


class AgentState:
    """Typed access to the files in `state_dir`."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    # paths
    @property
    def model_path(self) -> Path:
        return self.dir / "model.npz"

    @property
    def int8_path(self) -> Path:
        return self.dir / "model_int8.tflite"

    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"

    @property
    def modules_path(self) -> Path:
        return self.dir / "modules.json"

    # round
    def load_round(self) -> RoundState | None:
        p = self.dir / "round.json"
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text())
            return RoundState(**{k: d[k] for k in RoundState.__dataclass_fields__ if k in d})
        except (ValueError, TypeError, KeyError):
            return None  # unreadable state: behave as a fresh device rather than crash-loop

    def save_round(self, rs: RoundState) -> None:
        atomic_write(self.dir / "round.json", json.dumps(asdict(rs)).encode())

    def save_assignment(self, frame: bytes) -> None:
        atomic_write(self.dir / "assignment.bin", frame)

    def load_assignment(self) -> bytes | None:
        p = self.dir / "assignment.bin"
        return p.read_bytes() if p.is_file() else None

    def save_result(self, frame: bytes) -> None:
        atomic_write(self.dir / "result.bin", frame)

    def load_result(self) -> bytes | None:
        p = self.dir / "result.bin"
        return p.read_bytes() if p.is_file() else None

    def save_int8(self, model: bytes) -> None:
        atomic_write(self.int8_path, model)

    def write_modules(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record which top-level modules this process has imported (checked by tests: no torch)."""
        top = sorted({m.split(".")[0] for m in list(sys.modules)})
        info = {
            "pid": os.getpid(),
            "modules": top,
            "torch": "torch" in sys.modules,
            "tensorflow": "tensorflow" in sys.modules,
            **(extra or {}),
        }
        atomic_write(self.modules_path, json.dumps(info).encode())
        return info
