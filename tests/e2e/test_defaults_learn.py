"""`koala serve` with no policy settings, on the demo's data (Fashion-MNIST, 1,000-image proxy,
6,000 device images) with a few real agent processes over Mosquitto, learns.

Measured (2026-12-04, 3 devices, default KoalaPolicy): large-model test accuracy 0.518 -> 0.580
-> 0.693 over 3 rounds (chance 0.10). The test runs 2 rounds and asks for > 0.35.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.mosquitto]


def test_default_policy_learns_over_the_broker(tmp_path: Path) -> None:
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian dataset-fashion-mnist not installed (scripts/setup.sh installs it)")
    from server_app.demo.launcher import DemoConfig, DemoRun
    from server_app.policy import KoalaPolicy

    policy = KoalaPolicy(rounds=2, deadline_s=400.0)  # only the round count and a CI-sized deadline
    assert policy.explicit() == {"rounds", "deadline_s"}
    demo = DemoRun(DemoConfig(run_dir=str(tmp_path / "run"), dataset="fashion-mnist", devices=3, proxy_size=1000,
                              train_size=6000, test_size=2000, policy=policy, torch_threads=1))  # fmt: skip
    try:
        demo.start()
        assert demo.wait(timeout_s=900, progress=False), f"orchestrator {demo.services.orchestrator.state}"
        rows = demo.results()["rounds"]
    finally:
        demo.stop()
    acc = [r["large_test_acc"] for r in rows]
    assert len(acc) == 2 and acc[-1] > 0.35, acc
