"""One leading server per registry: the others wait as hot standbys and take over when it dies.

Two `koala serve` processes on one database would both run rounds: two orchestrators assigning the
same round, two ingestors splitting the results. The leader holds a lock that dies with it:

- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`) on a dedicated connection.
  A killed process's connection closes and PostgreSQL releases the lock at once; a standby polling
  `pg_try_advisory_lock` then gets it and starts, resuming the open round from the registry (the
  same path as a restart).
- SQLite: an exclusive `flock` on `<database file>.leader` (processes on one host, which is all a
  SQLite registry can serve); the kernel drops it when the process dies.
- Other databases: no lock; one server per registry is the operator's job (logged at start).

Fencing: the leader checks its lock connection every few seconds (`healthy`). If the connection is
gone (database restarted, network cut), PostgreSQL has released the lock and a standby may have
taken it. `LeaderWatchdog` then tries to take it again: got it -> nobody else leads, go on (a
database outage alone must not stop the only server); another process holds it -> this one must
stop leading and calls `on_lost` (the server stops itself; its service manager restarts it, as a
standby); database unreachable -> keep trying (nobody can take the lock meanwhile, and the
registry writes of a leader cut off from it fail anyway).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("koala.leader")

LOCK_NAME = "koala-edge-server-leader"


def _pg_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class LeaderLock:
    """try_acquire() once, or wait() until acquired; release() (or process death) lets a standby lead."""

    def __init__(self, db_url: str, name: str = LOCK_NAME):
        from sqlalchemy.engine import make_url

        self.db_url, self.name = db_url, name
        self.url = make_url(db_url)
        self.kind = ("postgresql" if self.url.get_backend_name() == "postgresql"
                     else "sqlite" if self.url.get_backend_name() == "sqlite" else "none")  # fmt: skip
        self.held = False
        self._conn: Any = None
        self._engine: Any = None
        self._fd: int | None = None

    # ------------------------------------------------------------- acquire
    def try_acquire(self) -> bool:
        """Take the lock if free; True when this process leads (also when the database has no lock)."""
        if self.held:
            return True
        if self.kind == "postgresql":
            self.held = self._try_pg()
        elif self.kind == "sqlite":
            self.held = self._try_sqlite()
        else:
            log.warning("no leader lock for %s databases: run one koala server per registry", self.url.get_backend_name())
            self.held = True
        return self.held

    def wait(self, stop: threading.Event, poll_s: float = 1.0) -> bool:
        """Block until this process leads (True) or `stop` is set (False)."""
        while not stop.is_set():
            try:
                if self.try_acquire():
                    return True
            except Exception as exc:  # database briefly unreachable: a standby keeps waiting
                log.warning("leader lock not checked (%s); retrying", exc)
                self._close()
            stop.wait(poll_s)
        return False

    def _try_pg(self) -> bool:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        if self._conn is None:
            self._engine = create_engine(self.db_url, poolclass=NullPool)
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = bool(self._conn.execute(text("select pg_try_advisory_lock(:k)"), {"k": _pg_key(self.name)}).scalar())
        if not got:
            self._close()  # a standby holds no connection open between polls
        return got

    def _try_sqlite(self) -> bool:
        import fcntl

        db = self.url.database
        if not db or db == ":memory:":
            return True  # an in-memory registry belongs to this process alone
        path = Path(db).with_name(Path(db).name + ".leader")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    # ------------------------------------------------------------- health
    def healthy(self) -> bool:
        """Whether this process still provably holds the lock (its lock connection answers)."""
        if not self.held:
            return False
        if self.kind != "postgresql":
            return True  # flock / no lock: held until the process exits
        from sqlalchemy import text

        try:
            self._conn.execute(text("select 1")).scalar()
            return True
        except Exception as exc:
            log.error("leader lock connection lost: %s", exc)
            return False

    def reacquire(self) -> bool | None:
        """After losing the lock connection: True when taken again, False when another process
        holds it now, None when the database cannot be reached."""
        self.held = False
        self._close()
        try:
            return self.try_acquire()
        except Exception as exc:
            log.warning("leader lock not re-acquired yet (%s)", exc)
            self._close()
            return None

    # ------------------------------------------------------------- release
    def release(self) -> None:
        if self.kind == "postgresql" and self.held and self._conn is not None:
            from sqlalchemy import text

            with contextlib.suppress(Exception):  # the connection is gone: so is the lock
                self._conn.execute(text("select pg_advisory_unlock(:k)"), {"k": _pg_key(self.name)})
        self.held = False
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class LeaderWatchdog:
    """Checks `lock.healthy()` every `interval_s`; when the lock connection is gone, takes the lock
    again, or calls `on_lost` once if another process holds it by then."""

    def __init__(self, lock: LeaderLock, on_lost: Callable[[], None], interval_s: float = 5.0):
        self.lock, self.on_lost, self.interval_s = lock, on_lost, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="koala-leader-watchdog", daemon=True)

    def start(self) -> LeaderWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.lock.healthy():
                continue
            while not self._stop.is_set():
                got = self.lock.reacquire()
                if got:
                    log.warning("leader lock re-acquired after its connection was lost: still leading")
                    break
                if got is False:
                    log.critical("another server holds the leader lock now: this server stops leading")
                    self.on_lost()
                    return
                self._stop.wait(self.interval_s)
