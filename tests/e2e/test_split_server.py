"""End to end, the server split by role (docs/scale-out.md): `koala demo --ingest-workers 2`.

A private Mosquitto, the orchestrator (`role orchestrator`, ingests nothing itself), two
`koala serve --role ingest` processes configured by KOALA_* env as a deployment would be, and three
real LiteRT device agents, on digits. Checks: every round completes with every device, each
accepted result was taken by one of the workers (both took some), the devices heard the workers'
verdicts, and the orchestrator's /metrics counts the results it read back from the registry.
"""

from __future__ import annotations

import urllib.request

import pytest

from server_app.demo.launcher import DemoConfig, DemoRun
from server_app.policy import KoalaPolicy

pytestmark = pytest.mark.mosquitto


def test_demo_with_two_ingestion_workers_and_real_agents(tmp_path):
    pol = KoalaPolicy(rounds=2, deadline_s=120, local_epochs=3, lr=3e-3, rkd_epochs=5, rkd_lr=3e-3,
                      large={"width": 8, "options": {"fc": 32}})  # fmt: skip
    cfg = DemoConfig(run_dir=str(tmp_path / "run"), dataset="digits", devices=3, proxy_size=200, train_size=None,
                     test_size=200, policy=pol, torch_threads=1, ingest_workers=2)  # fmt: skip
    demo = DemoRun(cfg)
    try:
        demo.start()
        assert demo.services.options.role == "orchestrator" and demo.services.ingest_worker is None
        assert demo.wait(timeout_s=300, progress=False)
        res = demo.results()
        with urllib.request.urlopen(f"http://127.0.0.1:{demo.http_port}/metrics", timeout=10) as r:
            scrape = r.read().decode()
    finally:
        demo.stop()
    assert [r["accepted"] for r in res["rounds"]] == [3, 3], res["rounds"]
    logs = {w: (demo.run_dir / "logs" / f"ingest-{w}.log").read_text() for w in ("w1", "w2")}
    taken = {w: log.count("accepted round=") for w, log in logs.items()}
    assert sum(taken.values()) == 6 and all(taken.values()), taken  # each result once, both workers busy
    assert all("role ingest" in log for log in logs.values())
    for p in sorted((demo.run_dir / "logs").glob("dev*.log")):  # the workers answer the devices
        assert "result verdict round=0 status=accepted" in p.read_text(), p.name  # (round 1's may land after stop)
    line = next(ln for ln in scrape.splitlines() if ln.startswith("koala_results_from_registry_total"))
    assert float(line.split()[-1]) >= 6
