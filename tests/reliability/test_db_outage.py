"""Database briefly unavailable: a TCP proxy between the server and PostgreSQL is cut mid-round.

The server is the real `ServerServices` in its own process, its registry a fresh PostgreSQL
database reached through `TcpProxy` (a forwarder this test controls). While round 0 collects, the
proxy drops every connection and refuses new ones for a few seconds, and the devices deliver their
results exactly inside that window. The server must not crash, must retry, and must lose nothing:
every result published is one accepted row, and both rounds complete.
"""

from __future__ import annotations

import time

import pytest
from rel_helpers import TcpProxy, server_options, wait_for
from rel_simdev import SimFleet

DEVS = ["p0", "p1", "p2", "p3"]
OUTAGE_S = 6.0


@pytest.mark.postgres
def test_postgres_cut_mid_round_loses_nothing(broker, digits_files, tmp_path, server_process, db_reader,
                                              pg_database_url):
    proxy = TcpProxy("127.0.0.1", 5432)
    direct = pg_database_url
    via_proxy = direct.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    assert via_proxy != direct
    gate = {"cut_at": None}

    def behaviour(dev: str, r: int):
        if r != 0:
            return "answer"
        # round 0: answer 1-2.5 s after the cut starts (the test cuts right after all are assigned)
        return 1.0 + 0.5 * DEVS.index(dev)

    fleet = SimFleet("127.0.0.1", broker.port, DEVS, behaviour=behaviour).start()
    opts = server_options(via_proxy, tmp_path / "server", digits_files, broker.port, rounds=2, min_devices=4,
                          deadline_s=120.0, quorum_fraction=1.0)  # fmt: skip
    db = db_reader(direct)
    server = server_process(opts)
    try:
        server.start()
        wait_for(lambda: all((d, 0) in fleet.assigned for d in DEVS), 120, "round 0 assignments")
        proxy.cut()
        gate["cut_at"] = time.monotonic()
        wait_for(lambda: sum(fleet.sent[(d, 0)] for d in DEVS) == 4, 30, "results sent during the outage")
        assert proxy.is_cut, "results must be published while the database is unreachable"
        while time.monotonic() - gate["cut_at"] < OUTAGE_S:
            time.sleep(0.1)
        proxy.restore()
        wait_for(lambda: (rs := db.rounds()) and len(rs) == 2 and all(r.state in ("completed", "failed")
                                                                       for r in rs.values()), 180, "both rounds")  # fmt: skip
        assert server.proc is not None and server.proc.poll() is None, "server process died"
        server.stop()
    finally:
        fleet.stop()
        proxy.close()
    rounds = db.rounds()
    assert [rounds[n].state for n in range(2)] == ["completed"] * 2, {n: rounds[n].error for n in rounds}
    accepted = {(a.device_id, a.round_id) for a in db.assignments() if a.status == "accepted"}
    assert accepted == set(fleet.sent), "a result published during the outage was lost"
    # QoS 1 is at-least-once: a server starved long enough to miss its keepalive reconnects and paho
    # re-sends an unacknowledged assignment (DUP), and a device answers every assignment it gets (seen
    # once in CI under load 8). The guarantee is on the server side: one accepted row per (device,
    # round), whatever was re-sent; and a device only ever answers an assignment it received.
    rows = [(a.device_id, a.round_id) for a in db.assignments() if a.status == "accepted"]
    assert len(rows) == len(set(rows)) == len(fleet.sent)
    assert all(n <= fleet.assignments[k] for k, n in fleet.sent.items()), (dict(fleet.sent), dict(fleet.assignments))
    logs = server.logs()
    retries = logs.count("database unavailable")
    assert retries > 0, "the outage was not seen by the server (proxy not in the path?)"
    print(f"\nRELIABILITY db-outage: outage_s={OUTAGE_S} results_during_outage=4 refused_connections={proxy.refused} "
          f"retry_log_lines={retries} accepted_rows={len(accepted)} sent={sum(fleet.sent.values())}")
