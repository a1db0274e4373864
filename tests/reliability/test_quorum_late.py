"""Below quorum and stragglers: a round that cannot reach quorum fails cleanly and the next starts;
a result that arrives after the deadline is recorded `late` and not folded in.

Real server process, four protocol-level simulated devices (so who answers when is exact). Round 0:
one device answers, one answers only after the deadline, two stay silent -> 1 accepted < quorum 2:
the round is `failed` with the reason, the silent devices are `dropped`, the straggler is `late`.
Round 1: everyone answers -> completed, and the straggler's round-0 logits are not in it.
"""

from __future__ import annotations

from rel_helpers import server_options, wait_for
from rel_simdev import SimFleet

DEADLINE_S = 8.0


def behaviour(dev: str, r: int):
    if r != 0:
        return "answer"
    return {"q0": "answer", "q1": DEADLINE_S + 4.0}.get(dev, "silent")


def test_below_quorum_fails_cleanly_next_round_runs_straggler_late(broker, digits_files, tmp_path, server_process,
                                                                   db_reader):
    db_url = f"sqlite:///{tmp_path / 'koala.db'}"
    fleet = SimFleet("127.0.0.1", broker.port, ["q0", "q1", "q2", "q3"], behaviour=behaviour).start()
    opts = server_options(db_url, tmp_path / "server", digits_files, broker.port, rounds=2, min_devices=4,
                          deadline_s=DEADLINE_S, quorum_fraction=0.5)  # fmt: skip
    db = db_reader(db_url)
    server = server_process(opts).start()
    try:
        wait_for(lambda: (rs := db.rounds()) and len(rs) == 2 and rs[1].state in ("completed", "failed"), 180,
                 "rounds 0 and 1")  # fmt: skip
        wait_for(lambda: fleet.sent[("q1", 0)] == 1, 60, "the straggler to send")
        wait_for(lambda: {a.device_id: a.status for a in db.assignments(0)}.get("q1") == "late", 60, "late recorded")
        assert server.proc is not None and server.proc.poll() is None
    finally:
        fleet.stop()
        server.stop()
    rounds = db.rounds()
    assert rounds[0].state == "failed" and "quorum" in (rounds[0].error or ""), rounds[0].error
    assert rounds[1].state == "completed", rounds[1].error
    r0 = {a.device_id: a.status for a in db.assignments(0)}
    assert r0 == {"q0": "accepted", "q1": "late", "q2": "dropped", "q3": "dropped"}
    assert {a.device_id: a.status for a in db.assignments(1)} == dict.fromkeys(["q0", "q1", "q2", "q3"], "accepted")
    assert int(rounds[1].metrics["accepted"]) == 4
    print(f"\nRELIABILITY quorum-late: round0={r0} round0_error={rounds[0].error!r} round1=completed accepted=4")
