"""RoundFollower: an ingestion worker's view of the round the orchestrator is collecting.

Why: `koala serve --role ingest` processes share the results subscription (`$share/...`) with the
orchestrator (or do all the ingesting for it) but run no rounds. To judge a result they need what
the orchestrator knows — which round is open, who was assigned what — and they learn it from the
two places every process shares: the registry (the newest round's state and deadline, revoked
devices) and the payload store (`submissions/r{n}/collection.json`, the round's expectations,
written before its assignments go out; see MqttFleet._run).

The view lags the registry by at most one poll; that never decides a result wrongly:
  * a result of a newer round than the view's makes the Ingestor refresh the view first;
  * lateness is decided by the registry, not by this clock: the orchestrator closes a round in
    one transaction (crud.close_collection) and a claim made after it fails (crud.claim_accepted),
    so the worker records the result `late`.
The worker's collection keeps no tensors (`keep_results=False`): accepted results live on disk
and in the registry, and the orchestrator reads them from there.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from server_app.rounds.collection import Collection

if TYPE_CHECKING:
    from server_app.ingest import Presence
    from server_app.rounds.store import RegistryStore

log = logging.getLogger("koala.follower")
POLL_S = 0.5


class RoundFollower:
    """`collection()` for the Ingestor; `refresh()` on demand; `start()` polls in a thread."""

    def __init__(self, store: RegistryStore, presence: Presence, poll_s: float = POLL_S):
        self.store = store
        self.presence = presence
        self.poll_s = poll_s
        self._col: Collection | None = None
        self._stamp: int | None = None  # mtime_ns of the loaded collection.json
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0
        self.last_error: str | None = None

    def collection(self) -> Collection | None:
        return self._col

    def refresh(self) -> None:
        """Read the newest round from the registry; load its expectations when it is collecting."""
        with self._lock:
            try:
                cur = self.store.open_round()
                revoked = set(self.store.revoked_devices())
            except Exception as exc:  # the registry is down: keep the last view, ingestion retries anyway
                if str(exc) != self.last_error:
                    log.warning("round view not refreshed: %s", exc)
                self.last_error = str(exc)
                return
            self.last_error = None
            self.polls += 1
            self.presence.sync_revoked(revoked)
            col = self._col
            if cur is None:
                return
            rid, state, deadline = cur
            if state in ("created", "collecting"):
                stamp = self.store.collection_stamp(rid)
                if col is None or col.round_id != rid or stamp != self._stamp:
                    # a new round, or the same one re-dispatched by a restarted orchestrator
                    col = self.store.load_collection(rid)
                    if col is None:  # round row written, expectations not yet: next poll
                        return
                    self._stamp = stamp
                    log.info("following round=%d participants=%d", rid, len(col.participants))
                if deadline is not None:
                    col.deadline = deadline
                col.closed = False
                self._col = col
            elif col is not None and col.round_id == rid and not col.closed:
                col.closed = True  # the orchestrator closed it: later results are late
                log.info("round closed round=%d state=%s accepted_here=%d", rid, state, col.accepted)

    def start(self) -> RoundFollower:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="koala-round-follower", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
