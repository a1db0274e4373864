"""Server killed (SIGKILL) mid-round: a new process on the same database resumes the round.

The server is the real `ServerServices` in its own OS process. Round 0 completes (so a large-model
version is committed); in round 1 two of four devices deliver and two hold back, then the server
process is SIGKILLed — no shutdown hook runs. A second process on the same database and data
directory must: resume round 1 (not start a new one), keep the two accepted submissions (same
digest, one row each, not re-assigned), assign only the missing devices, complete round 1 and the
next round. The committed large model must be whole at every point: the file loads and its sha256
equals the registry row (atomic tmp + fsync + rename writes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from rel_helpers import server_options, wait_for
from rel_simdev import SimFleet

DEVS = ["k0", "k1", "k2", "k3"]


def check_models(db) -> int:
    """Every registered large-model version: the file exists, loads, is finite and matches its sha."""
    models = db.models()
    for m in models:
        data = Path(m.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == m.sha256, f"v{m.version}: file differs from its DB row"
        state = torch.load(m.path, map_location="cpu", weights_only=False)
        assert state["version"] == m.version
        assert all(torch.isfinite(t).all() for t in state["large"].values() if t.is_floating_point())
    return max((m.version for m in models), default=0)


def test_sigkill_mid_round_resumes_from_the_database(broker, digits_files, tmp_path, server_process, db_reader):
    db_url = f"sqlite:///{tmp_path / 'koala.db'}"
    hold = {"k2", "k3"}
    fleet = SimFleet("127.0.0.1", broker.port, DEVS,
                     behaviour=lambda d, r: "silent" if r == 1 and d in hold else "answer").start()  # fmt: skip
    opts = server_options(db_url, tmp_path / "server", digits_files, broker.port, rounds=3, min_devices=4,
                          deadline_s=300.0, quorum_fraction=1.0)  # fmt: skip
    db = db_reader(db_url)
    first = server_process(opts).start()
    try:
        wait_for(lambda: sum(a.status == "accepted" for a in db.assignments(1)) == 2, 120, "round 1 half collected")
        assert db.rounds()[0].state == "completed"
        before = {a.device_id: a.digest for a in db.assignments(1) if a.status == "accepted"}
        first.kill()  # SIGKILL: no shutdown, no offline status, nothing flushed
        assert db.rounds()[1].state == "collecting"
        version_at_kill = check_models(db)
        assert version_at_kill == 1
        hold.clear()  # the held-back devices will answer the (re-)assignment of the new process
        second = server_process(opts).start()
        wait_for(lambda: (rs := db.rounds()) and len(rs) == 3 and all(r.state in ("completed", "failed")
                                                                       for r in rs.values()), 240, "rounds 1 and 2")  # fmt: skip
        second.stop()
    finally:
        fleet.stop()
    rounds = db.rounds()
    assert sorted(rounds) == [0, 1, 2], "the restarted server started a new round instead of resuming"
    assert [rounds[n].state for n in range(3)] == ["completed"] * 3, {n: rounds[n].error for n in rounds}
    rows = db.assignments(1)
    assert len(rows) == 4 and all(a.status == "accepted" for a in rows)
    assert {a.device_id: a.digest for a in rows if a.device_id in before} == before  # kept, not redone
    # no accepted submission lost or counted twice: each device answered round 1 once, and the two that
    # had delivered before the kill were not asked again
    assert {d: fleet.assignments[(d, 1)] for d in DEVS} == {"k0": 1, "k1": 1, "k2": 2, "k3": 2}
    assert {d: fleet.sent[(d, 1)] for d in DEVS} == dict.fromkeys(DEVS, 1)
    assert int(rounds[1].metrics["accepted"]) == 4
    assert check_models(db) == 3
    print(f"\nRELIABILITY server-kill: kills=1 resumed_round=1 accepted_before_kill={len(before)} "
          f"accepted_after={len(rows)} reassigned={sum(fleet.assignments[(d, 1)] - 1 for d in DEVS)} "
          f"models_verified={len(db.models())}")  # fmt: skip
