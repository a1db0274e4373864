"""A server split over processes survives the loss of any one of them (PostgreSQL registry).

Five real server processes on one PostgreSQL database and one data directory (the payload store):
an orchestrator (`role orchestrator`: leader lock, rounds, presence; it ingests nothing), a standby
orchestrator waiting for the leader lock, and two ingestion workers (`role ingest`, worker ids w1
and w2) sharing `$share/koala-server/.../up/result`. Six protocol-level devices.

Round 1: worker w1 is frozen (SIGSTOP) before the devices answer, so the broker deals it its share
of the results and they sit there unacknowledged; w2 accepts the rest, which the orchestrator
learns from the registry. w1 is then SIGKILLed and restarted under the same worker id (what a
supervisor does): its persistent session gives it back the results it held, and round 1 completes.
Round 2: three devices answer, then the orchestrator is SIGKILLed; the standby leads, resumes
round 2 (the three accepted rows kept) and the rest answer its re-assignment.

Nothing lost, nothing counted twice: every device's result accepted exactly once per round, each
device asked to publish each round's result once, every model version whole.
"""

from __future__ import annotations

import signal
import time

import pytest
from rel_helpers import ServerProcess, server_options, wait_for
from rel_simdev import SimFleet
from test_server_kill import check_models

DEVS = [f"w{i}" for i in range(6)]

pytestmark = [pytest.mark.postgres, pytest.mark.mosquitto]


def test_ingest_worker_and_orchestrator_sigkilled_mid_round(broker, digits_files, tmp_path, pg_database_url, db_reader):
    silent = {1: set(DEVS), 2: {"w3", "w4", "w5"}}  # round -> devices that hold back their result
    fleet = SimFleet("127.0.0.1", broker.port, DEVS,
                     behaviour=lambda d, r: "silent" if d in silent.get(r, ()) else "answer")  # fmt: skip
    base = dict(rounds=3, min_devices=6, deadline_s=300.0, quorum_fraction=1.0)
    data = tmp_path / "shared-data"
    orch_opts = server_options(pg_database_url, data, digits_files, broker.port, role="orchestrator", **base)
    worker = {w: server_options(pg_database_url, data, digits_files, broker.port, role="ingest", worker_id=w, **base)
              for w in ("w1", "w2")}  # fmt: skip
    db = db_reader(pg_database_url)

    def accepted(n: int) -> dict[str, str]:
        return {a.device_id: a.digest for a in db.assignments(n) if a.status == "accepted"}

    procs = {name: ServerProcess(opts, tmp_path / name) for name, opts in
             (("orch", orch_opts), ("standby", orch_opts), ("w1", worker["w1"]), ("w2", worker["w2"]))}  # fmt: skip
    try:
        procs["w1"].start()
        procs["w2"].start()
        procs["orch"].start()
        procs["standby"].spawn()
        fleet.start()
        wait_for(lambda: len(db.assignments(1)) == 6, 180, "round 0 completed and round 1 dispatched")
        assert db.rounds()[0].state == "completed"
        assert len(accepted(0)) == 6  # round 0 ingested by the workers alone

        # ---- round 1: one ingestion worker frozen with results in hand, killed, restarted
        w1 = procs["w1"]
        assert w1.proc is not None
        w1.proc.send_signal(signal.SIGSTOP)
        for d in DEVS:
            fleet.answer(d, 1)
        wait_for(lambda: sum(fleet.sent[(d, 1)] for d in DEVS) == 6, 30, "all six results published")
        wait_for(lambda: len(accepted(1)) >= 1, 60, "w2 accepting its share")
        time.sleep(2.0)  # w2 is done with what it was dealt; w1 holds the rest
        held = 6 - len(accepted(1))
        assert held >= 1, "the broker dealt the frozen worker nothing: the test proves nothing"
        w1.kill()  # SIGKILL while stopped: no PUBACK was ever sent for what it held
        time.sleep(1.0)
        assert len(accepted(1)) == 6 - held  # nobody else took w1's results
        w1.start()  # same worker id: the persistent session hands them back
        wait_for(lambda: len(accepted(1)) == 6, 60, "w1's results after its restart")

        # ---- round 2: the orchestrator killed mid-round, the standby resumes it
        wait_for(lambda: len(accepted(2)) == 3, 120, "round 2 half collected")
        before = accepted(2)
        silent[2].clear()  # the held-back devices answer the standby's re-assignment
        procs["orch"].kill()
        procs["standby"].wait_ready()
        wait_for(lambda: (rs := db.rounds()) and len(rs) == 3 and all(r.state in ("completed", "failed")
                                                                       for r in rs.values()), 240, "rounds 1 and 2")  # fmt: skip
    finally:
        fleet.stop()
        for p in procs.values():
            p.stop()
    rounds = db.rounds()
    assert [rounds[n].state for n in range(3)] == ["completed"] * 3, {n: rounds[n].error for n in rounds}
    for n in range(3):
        rows = db.assignments(n)
        assert len(rows) == 6 and all(a.status == "accepted" for a in rows), [(a.device_id, a.status) for a in rows]
        assert {d: fleet.sent[(d, n)] for d in DEVS} == dict.fromkeys(DEVS, 1)  # each device published once
        assert {a.device_id: a.digest for a in rows} == {d: _digest(fleet.frames[(d, n)]) for d in DEVS}
    assert {d: dg for d, dg in accepted(2).items() if d in before} == before  # kept, not redone
    assert check_models(db) == 3
    logs = {name: p.logs() for name, p in procs.items()}
    assert "round view not refreshed" not in logs["w2"]
    assert "accepted round=1" in logs["w1"] and "accepted round=1" in logs["w2"]  # both workers ingested
    assert "accepted round=" not in logs["orch"]  # the orchestrator ingests nothing itself
    assert "standby takes over" in logs["standby"]
    print(f"\nRELIABILITY ingest workers: round 1 results held by the killed worker={held}, "
          f"round 2 accepted before the orchestrator kill={len(before)}")


def _digest(frame: bytes) -> str:
    from device_firmware_py.contract import codec

    return codec.frame_digest(frame)
