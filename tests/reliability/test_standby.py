"""A hot standby takes over when the leading server is SIGKILLed mid-round (PostgreSQL registry).

Two real server processes on one PostgreSQL database and one data directory. The first leads (it
holds the registry's leader lock, server_app.rounds.leader); the second starts at the same time and
waits as a standby: no MQTT link, no rounds, no READY. Round 0 completes; in round 1 two of four
devices deliver and two hold back, then the leader is SIGKILLed. PostgreSQL drops its session and
with it the advisory lock; the standby takes over within its poll interval, resumes round 1 from
the registry (the two accepted submissions kept, only the missing devices re-assigned) and runs
round 2. Nothing is lost or counted twice.
"""

from __future__ import annotations

import time

import pytest
from rel_helpers import ServerProcess, server_options, wait_for
from rel_simdev import SimFleet
from test_server_kill import check_models

DEVS = ["s0", "s1", "s2", "s3"]

pytestmark = [pytest.mark.postgres, pytest.mark.mosquitto]


def test_standby_takes_over_a_sigkilled_leader_mid_round(broker, digits_files, tmp_path, pg_database_url, db_reader):
    hold = {"s2", "s3"}
    fleet = SimFleet("127.0.0.1", broker.port, DEVS,
                     behaviour=lambda d, r: "silent" if r == 1 and d in hold else "answer").start()  # fmt: skip
    opts = server_options(pg_database_url, tmp_path / "server", digits_files, broker.port, rounds=3, min_devices=4,
                          deadline_s=300.0, quorum_fraction=1.0)  # fmt: skip
    db = db_reader(pg_database_url)
    leader = ServerProcess(opts, tmp_path / "a").start()
    standby = ServerProcess(opts, tmp_path / "b").spawn()
    try:
        wait_for(lambda: sum(a.status == "accepted" for a in db.assignments(1)) == 2, 120, "round 1 half collected")
        assert standby.proc is not None and standby.proc.poll() is None  # alive, waiting
        assert "standby: another koala server leads" in standby.log_path.read_text()
        assert db.rounds()[0].state == "completed"
        before = {a.device_id: a.digest for a in db.assignments(1) if a.status == "accepted"}
        hold.clear()  # the held-back devices answer the standby's re-assignment
        leader.kill()  # SIGKILL: no shutdown hook, no lock release
        t_kill = time.monotonic()
        standby.wait_ready()
        takeover_s = time.monotonic() - t_kill
        wait_for(lambda: (rs := db.rounds()) and len(rs) == 3 and all(r.state in ("completed", "failed")
                                                                       for r in rs.values()), 240, "rounds 1 and 2")  # fmt: skip
        standby.stop()
    finally:
        fleet.stop()
        leader.stop()
        standby.stop()
    rounds = db.rounds()
    assert sorted(rounds) == [0, 1, 2]
    assert [rounds[n].state for n in range(3)] == ["completed"] * 3, {n: rounds[n].error for n in rounds}
    rows = db.assignments(1)
    assert len(rows) == 4 and all(a.status == "accepted" for a in rows)
    assert {a.device_id: a.digest for a in rows if a.device_id in before} == before  # kept, not redone
    assert {d: fleet.sent[(d, 1)] for d in DEVS} == dict.fromkeys(DEVS, 1)  # each device answered once
    assert check_models(db) == 3
    assert "standby takes over" in standby.log_path.read_text()
    print(f"\nRELIABILITY standby: takeover_s={takeover_s:.1f} resumed_round=1 accepted_before_kill={len(before)}")
