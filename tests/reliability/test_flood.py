"""One device floods the server within its own grants while honest rounds run (issue 28).

Real processes only: the README's production path on loopback (`koala data prepare`, `koala
provision fleet`, Mosquitto from the generated dynamic-security config with TLS, `koala serve
--config server.toml`, every bundle flashed and its real agent started), and an attacker holding
one device's credentials and bound client id. It replays the mix that once left the server
connected but ingesting nothing until a restart — results with a fresh round id on every message,
then progress at QoS 0, then retained status — and then forces an intake stall (the server's
link to the broker goes half-open) that /readyz must report and the watchdog must cure.
"""

from __future__ import annotations

import time

import pytest

from bench.flood import KINDS, Attacker, Stack, run_flood
from server_app.provisioning.local_broker import find_mosquitto

pytestmark = [pytest.mark.mosquitto, pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")]


def _wait(cond, timeout_s: float, what: str):  # noqa: ANN001, ANN202
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_mixed_flood_loses_no_honest_result_and_a_stall_recovers(tmp_path) -> None:
    env = {"KOALA_POLICY__ROUNDS": "100000", "KOALA_POLICY__DEADLINE_S": "30", "KOALA_POLICY__MIN_DEVICES": "2",
           "KOALA_INGEST__QUARANTINE_S": "5", "KOALA_INGEST__WATCHDOG_INTERVAL_S": "2",
           "KOALA_INGEST__WATCHDOG_STALL_S": "20"}  # fmt: skip
    stack = Stack(tmp_path / "fleet", devices=5, server_env=env, via_proxy=True).start()
    try:
        assert stack.wait_rounds_done(1, 240), stack.rounds()
        attacker = Attacker(stack)
        row = run_flood(stack, attacker, KINDS, seconds=4.0)
        attacker.close()
        print("FLOOD", row)
        assert row["sent"] > 300, row  # it was a flood
        assert row["honest_lost"] == 0 and row["honest_accepted"] >= len(stack.honest), row
        assert row["rounds_failed"] == 0 and row["rounds_completed"] >= 1, row
        # bounded registry growth: the rounds' own rows plus a few events per device and window,
        # not one row per flooded message
        assert row["registry_rows_added"] <= 10 * (row["rounds_completed"] + 2) + 20, row
        assert row["dropped_early"] > 0, row
        events = stack.db(f"select kind, count(*) from events where device_id = '{stack.attacker}' group by kind")
        assert dict(events).get("quarantined", 0) >= 1, events

        # a forced intake stall: the server's connections to the broker go silent (half-open)
        assert stack.ready()["status"] == "ok"
        done_before = max(r for r, (s, _e) in stack.rounds().items() if s == "completed")
        stack.proxy.half_open()
        degraded = _wait(lambda: (r := stack.ready()) and r["checks"].get("intake") is False and r, 60,
                         "/readyz reporting the silent intake")  # fmt: skip
        assert degraded["status"] == "degraded", degraded
        _wait(lambda: (r := stack.ready()) and r["status"] == "ok", 90, "/readyz ok again (watchdog reconnect)")
        metrics = stack.metric("koala_intake_")
        assert metrics.get("stalls_total", 0) >= 1 and metrics.get("recoveries_total", 0) >= 1, metrics
        _wait(lambda: any(r > done_before + 1 and s == "completed" for r, (s, _e) in stack.rounds().items()), 180,
              "a round started after the stall completes")  # fmt: skip
        assert stack.procs["server"].poll() is None  # no restart
    finally:
        stack.stop()
