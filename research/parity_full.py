"""Parity of simulation and deployment at issue 15's full scale (research).

    python -m research.parity_full koala_hetero+micro+int8 --alpha 0.5 --seed 0
        -> research/results/parity_fmnist_full/<method>_a<alpha>_s<seed>.json

All 55,000 device images, 5,000 proxy, 10 rounds through the deployed path (`koala demo`'s DemoRun:
20 agent processes over a private Mosquitto, SQLite registry), against research/koala_full.py's part
file for the same method and seed. Both run torch with koala_full's one thread: the thread count
changes float summation order and with it, over ten rounds of training, the trajectory (`koala demo`
defaults to 2 threads). The product's parity check at the README's headline setting is
`koala bench parity` (bench/parity.py).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def run_full(method: str, alpha: float, seed: int, out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Issue 15's full scale through the deployed path: one `research/koala_full.py` method (its policy,
    data layout and torch thread count) run by `koala demo`'s DemoRun — 20 agent processes over a
    private Mosquitto, SQLite registry — and compared round by round with that method's simulated
    part file (run first if it is missing). Written to parity_fmnist_full/<method>_a<alpha>_s<seed>.json."""
    import json

    from bench.common import table
    from research import koala_full as kf
    from server_app.demo.launcher import DemoConfig, DemoRun

    out = (out or RESULTS) / "parity_fmnist_full"
    started = time.time()
    sim_doc = kf.run_one(method, alpha, seed, progress=progress)  # the part file, or run it now
    cfg = kf.run_config(method, alpha, seed)
    spec = cfg.method_specs()[0]  # devices get archs round-robin in both paths (fleet_data, sim.runner)
    policy = spec.policy(cfg.policy, cfg.homo_arch, cfg.hetero_archs).with_overrides(deadline_s=3600.0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="koala-parity-full-") as tmp:
        demo = DemoRun(DemoConfig(run_dir=str(Path(tmp) / "run"), dataset=cfg.dataset, devices=cfg.devices,
                                  alpha=cfg.alpha, proxy_size=cfg.proxy_size, train_size=cfg.train_size, test_size=None,
                                  policy=policy, torch_threads=cfg.torch_threads))  # fmt: skip
        try:
            demo.start()
            ok = demo.wait(timeout_s=policy.rounds * 3600, progress=progress)
            res = demo.results()
        finally:
            demo.stop()
    t_dep = time.perf_counter() - t0
    sim_acc = [c["large_test_acc"] for c in sim_doc["curve"]]
    dep_acc = [r["large_test_acc"] for r in res["rounds"]]
    diffs = [abs(a - b) for a, b in zip(sim_acc, dep_acc, strict=False)]
    print(table(["round", "sim acc", "deployed acc", "|diff|"],
                [[i, a, b, d] for i, (a, b, d) in enumerate(zip(sim_acc, dep_acc, diffs, strict=False))]))  # fmt: skip
    doc = {"method": method, "alpha": alpha, "seed": seed, "policy": policy.model_dump(mode="json"),
           "devices": cfg.devices, "proxy_size": cfg.proxy_size, "train_size": cfg.train_size,
           "torch_threads": cfg.torch_threads, "sim_acc": sim_acc, "deployed_acc": dep_acc, "abs_diff": diffs,
           "max_abs_diff": max(diffs) if diffs else None, "deployed_finished": ok,
           "t_sim_s": sim_doc["wall_s"], "t_deployed_s": t_dep, "peak_rss_kib": res.get("peak_rss_kib"),
           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
           "sim_part": str(kf.part_path(method, alpha, seed).relative_to(kf.RESULTS))}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{method.replace('+', '_')}_{kf._akey(alpha)}_s{seed}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"-> {path}")
    return doc


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m research.parity_full", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", help="a research/koala_full.py method at full scale (e.g. koala_homo)")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (default 0.5)")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    a = ap.parse_args()
    run_full(a.method, a.alpha, a.seed)
