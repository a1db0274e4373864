"""Parity of simulation and deployment on Fashion-MNIST with the README's headline setting.

The same KoalaPolicy (the defaults: koala_homo, 5 local + 1 forward-KD + 4 reverse-KD epochs,
1,000 of the 5,000 proxy images per round) and seed, run twice on the same partition:
  * `koala sim` (InMemoryFleet: LiteRT devices in this process, frames through the codec);
  * the deployed path (`koala demo`'s DemoRun: private Mosquitto, SQLite registry, the server,
    one device-agent OS process per device).
Both score the large model on the full 10,000-image test set after every round.

    python -m bench.parity [--quick]      -> bench/results/parity_fmnist[.quick].json
    (koala bench parity)

Full: 20 devices, 6,000 device images (Dirichlet 0.5), 10 rounds (~25 min on 2 cores).
Quick: 5 devices, 3 rounds.

Issue 15's full scale through the deployed path (a research/koala_full.py method against its
simulated part file) is research/parity_full.py.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "parity_fmnist"


def run(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    from bench.common import DEFAULT_OUT, table, write_result
    from server_app.demo.launcher import DemoConfig, DemoRun
    from server_app.policy import KoalaPolicy
    from server_app.sim.config import load_config
    from server_app.sim.runner import run_experiment

    out = out or DEFAULT_OUT
    started, load_start = time.time(), os.getloadavg()
    devices, rounds = (5, 3) if quick else (20, 10)
    data = {"dataset": "fashion-mnist", "devices": devices, "alpha": 0.5, "proxy_size": 5000, "train_size": 6000}
    policy = KoalaPolicy(rounds=rounds, deadline_s=1800.0, min_devices=devices)
    with tempfile.TemporaryDirectory(prefix="koala-parity-") as tmp:
        t0 = time.perf_counter()
        cfg = load_config(None, **data, methods=["policy"], out=str(Path(tmp) / "sim"), torch_threads=2,
                          policy=policy.model_dump(exclude_unset=True))  # fmt: skip
        sim = run_experiment(cfg, progress=True, write=False)
        sim_acc = [c["large_test_acc"] for c in sim["curves"]["policy"]]
        t_sim = time.perf_counter() - t0
        t0 = time.perf_counter()
        demo = DemoRun(DemoConfig(run_dir=str(Path(tmp) / "run"), dataset="fashion-mnist", devices=devices,
                                  alpha=0.5, proxy_size=5000, train_size=6000, test_size=None, policy=policy,
                                  torch_threads=2))  # fmt: skip
        try:
            demo.start()
            ok = demo.wait(timeout_s=rounds * 1800, progress=True)
            res = demo.results()
        finally:
            demo.stop()
        t_dep = time.perf_counter() - t0
    dep_acc = [r["large_test_acc"] for r in res["rounds"]]
    diffs = [abs(a - b) for a, b in zip(sim_acc, dep_acc, strict=False)]
    print(table(["round", "sim acc", "deployed acc", "|diff|"],
                [[i, a, b, d] for i, (a, b, d) in enumerate(zip(sim_acc, dep_acc, diffs, strict=False))]))  # fmt: skip
    raw = {"rounds": rounds, "proxy_per_round": policy.proxy_per_round, "proxy_size": 5000, "devices": devices,
           "sim_acc": sim_acc, "deployed_acc": dep_acc, "abs_diff": diffs, "deployed_finished": ok,
           "t_sim_s": t_sim, "t_deployed_s": t_dep, "policy": policy.model_dump(mode="json"), "data": data}  # fmt: skip
    doc = write_result(NAME, out, quick=quick, params={**data, "rounds": rounds}, raw=raw,
                       ratios={"max_abs_diff": max(diffs) if diffs else None,
                               "deployed_over_sim_wall": t_dep / t_sim if t_sim else None},
                       notes=["same policy, seed and partition; test set: all 10,000 images, every round"],
                       started=started, load_start=load_start)  # fmt: skip
    # the field names at the top level too
    import json

    p = Path(doc["path"])
    full = json.loads(p.read_text())
    full.update({k: raw[k] for k in ("rounds", "proxy_per_round", "proxy_size", "sim_acc", "deployed_acc")})
    p.write_text(json.dumps(full, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    run(quick=ap.parse_args().quick)
