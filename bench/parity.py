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

    python -m bench.parity --full koala_hetero+micro+int8 --alpha 0.5 --seed 0
        -> bench/results/parity_fmnist_full/<method>_a<alpha>_s<seed>.json

Issue 15's full scale (all 55,000 device images, 5,000 proxy, 10 rounds) through the deployed path,
against bench/koala_full.py's part file for the same method and seed. Both run torch with
koala_full's one thread: the thread count changes float summation order and with it, over ten
rounds of training, the trajectory (`koala demo` defaults to 2 threads).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "parity_fmnist"


def run(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    from bench.common import table, write_result
    from server_app.demo.launcher import DemoConfig, DemoRun
    from server_app.policy import KoalaPolicy
    from server_app.sim.config import load_config
    from server_app.sim.runner import run_experiment

    out = out or Path(__file__).resolve().parent / "results"
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


def run_full(method: str, alpha: float, seed: int, out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Issue 15's full scale through the deployed path: one `bench/koala_full.py` method (its policy,
    data layout and torch thread count) run by `koala demo`'s DemoRun — 20 agent processes over a
    private Mosquitto, SQLite registry — and compared round by round with that method's simulated
    part file (run first if it is missing). Written to parity_fmnist_full/<method>_a<alpha>_s<seed>.json."""
    import json

    from bench import koala_full as kf
    from bench.common import table
    from server_app.demo.launcher import DemoConfig, DemoRun

    out = (out or Path(__file__).resolve().parent / "results") / "parity_fmnist_full"
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

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", metavar="METHOD", help="a bench/koala_full.py method at full scale (e.g. koala_homo)")
    ap.add_argument("--alpha", type=float, default=0.5, help="with --full: Dirichlet alpha (default 0.5)")
    ap.add_argument("--seed", type=int, default=0, help="with --full: seed (default 0)")
    a = ap.parse_args()
    if a.full:
        run_full(a.full, a.alpha, a.seed)
    else:
        run(quick=a.quick)
