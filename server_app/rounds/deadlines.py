"""Round deadlines sized from what devices of each architecture measurably take, and told apart
from dead devices by their progress reports.

A fixed deadline has to cover the slowest architecture on the slowest link, so a round with one
dead device always waits the whole of it (120 s by default), and a Pi Zero running mobilenet_tiny
under a CPU quota may need more than a fast x86 box running mlp_tiny ever does. With the policy's
`deadline_factor` set, a round's deadline is

    clamp(deadline_factor x p90(round time of each participating architecture), deadline_min_s, deadline_s)

where a device's round time is assignment sent -> its result accepted (compute and transfer), the
90th percentile over that architecture's last `WINDOW` accepted results. Until every architecture
of the round has `MIN_SAMPLES` measurements the deadline is `deadline_s`.

Slow is not dead: when a round's deadline passes and a missing participant has published progress
for this round within `PROGRESS_GRACE_S` (`koala/v1/devices/{id}/up/progress`), the deadline moves
on by one more planned window, never past `deadline_s` after dispatch. A device that has gone
silent gets no extension.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import Any

import numpy as np

WINDOW = 50  # accepted results per architecture the estimate looks at
MIN_SAMPLES = 2  # measurements per architecture before its estimate is used
PROGRESS_GRACE_S = 30.0  # a device that reported progress this recently is alive


class DeadlinePlanner:
    """Per-architecture round-time estimates -> the next round's deadline (seconds from dispatch)."""

    def __init__(self, deadline_s: float, factor: float | None = None, min_s: float = 10.0, window: int = WINDOW):
        self.deadline_s, self.factor, self.min_s = float(deadline_s), factor, float(min_s)
        self._times: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self._lock = threading.Lock()

    def observe(self, arch: str, seconds: float) -> None:
        """One accepted result of `arch` took `seconds` from its assignment being sent."""
        if seconds >= 0 and np.isfinite(seconds):
            with self._lock:
                self._times[arch].append(float(seconds))

    def estimate(self, arch: str) -> float | None:
        """The 90th-percentile round time of `arch`, or None with fewer than MIN_SAMPLES."""
        with self._lock:
            xs = list(self._times.get(arch, ()))
        return float(np.percentile(xs, 90)) if len(xs) >= MIN_SAMPLES else None

    def timeout_for(self, archs: Iterable[str]) -> float:
        """Seconds the round with these participants' architectures waits (before extensions)."""
        if self.factor is None:
            return self.deadline_s
        est = [self.estimate(a) for a in set(archs)]
        if not est or any(e is None for e in est):
            return self.deadline_s  # an architecture nobody has measured yet: the full deadline
        return float(min(self.deadline_s, max(self.min_s, self.factor * max(e for e in est if e is not None))))

    def snapshot(self) -> dict[str, float | None]:
        """Per-architecture estimates (for logs and the round's metrics)."""
        with self._lock:
            archs = list(self._times)
        return {a: self.estimate(a) for a in sorted(archs)}


def alive(progress: dict[str, Any] | None, round_id: int, now: float, grace_s: float = PROGRESS_GRACE_S) -> bool:
    """Whether a device's last progress report (presence.progress entry) shows it working on this round."""
    if not progress or progress.get("round_id") != round_id:
        return False
    at = progress.get("at")
    return isinstance(at, (int, float)) and now - float(at) <= grace_s
