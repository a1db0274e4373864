"""The leader lock (server_app.rounds.leader): one holder per registry on SQLite and PostgreSQL;
released on release() and on process death; a standby's wait() returns when it is free."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from server_app.rounds.leader import LeaderLock, LeaderWatchdog


def test_one_holder_then_the_standby(db_url):
    a, b = LeaderLock(db_url), LeaderLock(db_url)
    assert a.try_acquire() and a.held
    assert not b.try_acquire() and not b.held
    stop = threading.Event()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(b.wait(stop, poll_s=0.05)))
    t.start()
    time.sleep(0.3)
    assert not got  # still waiting while a leads
    a.release()
    t.join(10)
    assert got == [True] and b.held and b.healthy()
    assert not a.try_acquire()
    b.release()
    assert a.try_acquire()
    a.release()


def test_a_waiting_standby_stops_when_told(db_url):
    a, b = LeaderLock(db_url), LeaderLock(db_url)
    assert a.try_acquire()
    stop = threading.Event()
    stop.set()
    assert b.wait(stop) is False
    a.release()


def test_the_lock_dies_with_its_process(db_url):
    """A leader SIGKILLed: no release() ran, yet the lock is free (PostgreSQL closes the session,
    the kernel drops the flock)."""
    code = (
        "import sys, time; from server_app.rounds.leader import LeaderLock; "
        f"l = LeaderLock({db_url!r}); assert l.try_acquire(); print('HELD', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "HELD"
        mine = LeaderLock(db_url)
        assert not mine.try_acquire()
        p.kill()
        p.wait(10)
        deadline = time.monotonic() + 10
        while not mine.try_acquire() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mine.held
        mine.release()
    finally:
        p.kill()


def test_in_memory_sqlite_and_other_databases_need_no_lock():
    assert LeaderLock("sqlite://").try_acquire()
    assert LeaderLock("sqlite:///:memory:").try_acquire()


@pytest.mark.postgres
def test_watchdog_keeps_leading_after_a_lost_connection_if_nobody_took_over(pg_database_url):
    """A database restart or cut drops the lock connection (and the lock): with no standby the
    leader takes the lock again and goes on; it must not stop the only server."""
    lock = LeaderLock(pg_database_url)
    assert lock.try_acquire()
    lost = threading.Event()
    dog = LeaderWatchdog(lock, lost.set, interval_s=0.05).start()
    lock._conn.invalidate()  # the connection to PostgreSQL is gone
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (lock.held and lock.healthy()):
        time.sleep(0.05)
    assert lock.held and lock.healthy() and not lost.is_set()
    assert not LeaderLock(pg_database_url).try_acquire()  # still the leader's
    dog.stop()
    lock.release()


@pytest.mark.postgres
def test_watchdog_fences_a_leader_whose_lock_was_taken(pg_database_url):
    lock, standby = LeaderLock(pg_database_url), LeaderLock(pg_database_url)
    assert lock.try_acquire()
    lost = threading.Event()
    lock._conn.invalidate()  # connection gone -> PostgreSQL releases the lock...
    deadline = time.monotonic() + 5
    while not standby.try_acquire() and time.monotonic() < deadline:  # ...and a standby takes it
        time.sleep(0.05)
    assert standby.held
    dog = LeaderWatchdog(lock, lost.set, interval_s=0.05).start()
    assert lost.wait(5)  # the old leader stops leading
    dog.stop()
    standby.release()
    lock.release()
