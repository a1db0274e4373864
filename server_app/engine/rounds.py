"""run_rounds: the ONE round loop, shared by simulation (InMemoryFleet) and deployment (MQTT fleet)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from server_app.engine.fleet import Fleet
from server_app.engine.strategy import RoundRejected, Strategy
from server_app.engine.types import RoundReport, payload_nbytes


def run_rounds(
    strategy: Strategy,
    fleet: Fleet,
    rounds: int,
    evaluate: Callable[[int], dict[str, Any]] | None = None,
    progress: Callable[[RoundReport], None] | None = None,
    timeout_s: float | None = None,
    start_round: int = 0,
    record_rejected: bool = False,
) -> list[RoundReport]:
    """sample -> configure -> fleet.run_round -> aggregate -> evaluate, `rounds` times.

    A round whose aggregation the strategy rejects (`RoundRejected`: the model gate rolled it
    back) raises, so the deployed orchestrator fails it with the reason; with `record_rejected`
    (the simulator) it is reported as `rejected` and the loop goes on.

    Adds transport-independent accounting to each report: tensor bytes down/up per device and
    wall time per phase. `evaluate(round_id)` returns test metrics merged into the report.
    """
    reports = []
    for r in range(start_round, start_round + rounds):
        t0 = time.perf_counter()
        devices = strategy.sample(r, fleet.devices())
        assignments = strategy.configure_round(r, devices)
        t1 = time.perf_counter()
        results = fleet.run_round(assignments, strategy.quorum(len(assignments)), timeout_s)
        t2 = time.perf_counter()
        try:
            report = strategy.aggregate(r, results)
        except RoundRejected as exc:
            if not record_rejected:
                raise
            report = RoundReport(r, {"rejected": str(exc)}, len(results))
        t3 = time.perf_counter()
        m = report.metrics
        n_a, n_r = max(len(assignments), 1), max(len(results), 1)
        m["bytes_down_per_device"] = sum(payload_nbytes(a) for a in assignments) / n_a
        asked = {a.device_id: a.plan.logits_dtype for a in assignments}
        m["bytes_up_per_device"] = sum(payload_nbytes(x, asked.get(x.device_id)) for x in results) / n_r
        m["t_configure_s"], m["t_devices_s"], m["t_aggregate_s"] = t1 - t0, t2 - t1, t3 - t2
        if evaluate is not None:
            m.update(evaluate(r))
        m["t_round_s"] = time.perf_counter() - t0
        report.num_results = len(results)
        reports.append(report)
        if progress is not None:
            progress(report)
    return reports
