"""Load: 200 concurrent device connections through 5 real rounds, no submission lost or duplicated.

The server is the real `ServerServices` in its own process (registry on SQLite, ingestion through a
shared subscription, orchestrator running KOALA rounds with reverse KD). The 200 devices are
protocol-level simulated devices on real paho connections to a private Mosquitto: each answers
every assignment it gets with one valid result frame. The check is bookkeeping, exactly: for
every (device, round) the fleet published a result for, the registry holds one accepted
assignment row with that frame's digest (codec.frame_digest) — rows == sent, no more, no less.
"""

from __future__ import annotations

from collections import Counter

from rel_helpers import server_options, wait_for
from rel_simdev import SimFleet

from device_firmware_py.contract import codec

N_DEVICES = 200
ROUNDS = 5


def test_200_devices_5_rounds_rows_equal_sent(broker, digits_files, tmp_path, server_process, db_reader):
    db_url = f"sqlite:///{tmp_path / 'koala.db'}"
    opts = server_options(db_url, tmp_path / "server", digits_files, broker.port, rounds=ROUNDS,
                          min_devices=N_DEVICES, deadline_s=120.0, quorum_fraction=1.0)  # fmt: skip
    ids = [f"load{i:03d}" for i in range(N_DEVICES)]
    fleet = SimFleet("127.0.0.1", broker.port, ids).start(timeout_s=120)
    server = server_process(opts).start()
    db = db_reader(db_url)
    try:
        wait_for(lambda: (rs := db.rounds()) and len(rs) == ROUNDS and all(r.state in ("completed", "failed")
                                                                            for r in rs.values()),
                 600, "5 rounds to finish", step=1.0)  # fmt: skip
    finally:
        fleet.stop()
        server.stop()
    rounds = db.rounds()
    assert [rounds[n].state for n in range(ROUNDS)] == ["completed"] * ROUNDS, {n: rounds[n].error for n in rounds}
    assert not fleet.errors
    assert all(v == 1 for v in fleet.sent.values()), "a simulated device answered one assignment twice"
    rows = db.assignments()
    accepted = {(a.device_id, a.round_id): a.digest for a in rows if a.status == "accepted"}
    # rows == sent: the same (device, round) set, each with the digest of the exact bytes published
    assert set(accepted) == set(fleet.sent)
    assert len(accepted) == N_DEVICES * ROUNDS
    assert all(accepted[k] == codec.frame_digest(fleet.frames[k]) for k in accepted)
    assert Counter(a.status for a in rows) == Counter({"accepted": N_DEVICES * ROUNDS})
    assert [int(rounds[n].metrics.get("accepted", -1)) for n in range(ROUNDS)] == [N_DEVICES] * ROUNDS
    print(f"\nRELIABILITY load: devices={N_DEVICES} rounds={ROUNDS} sent={sum(fleet.sent.values())} "
          f"accepted_rows={len(accepted)} assignments={sum(fleet.assignments.values())}")  # fmt: skip
