"""Accuracy under attack over the broker (issue 28 item 4): the deployed version of bench/attacks.py.

Every run is `koala demo`'s DemoRun: a private Mosquitto, a SQLite registry, the real server
(ServerServices: ingestion, accept decision, orchestrator, strategy) and one OS process per
device. Honest devices run the product agent (`koala-device run`); malicious ones run
`bench/attack_agent.py`: the same agent, whose result is forged after honest training, so they
speak the wire protocol with their own credentials and topics. Per attack and fleet, three runs
with the same seed (same partition, same initial models):

  clean        every device honest
  honest only  the malicious devices' agents never start (their data is lost: the best any
               defence can do)
  attacked     the malicious devices attack from round 0

Settings: the production walk-through's (README "Production, step by step"): Fashion-MNIST,
`koala data prepare --train-size 6000 --proxy-size 1000` (Dirichlet 0.5, seed 0, the whole 10,000
image test set) with the labeled proxy rows `koala data prepare` writes by default
(`server_app.data.prepare.default_labeled_proxy`: 100 of 1,000), and the default KoalaPolicy
(what `koala provision fleet`'s server.toml runs: no [policy] section), except
  * rounds = 5 (the walk-through runs until stopped) and deadline_s = 900 (every device answers
    every round on this shared 2-core machine; the deadline is no defence setting);
  * one-hot logits need a logits upload: the default homogeneous policy uploads weights
    (teacher avg_model), so that attack runs with teacher = device_logits (the koala_hetero default).
The malicious devices are the first of the partition (dev000, dev001), as in bench/attacks.py.

Per round the harness records (instrumentation only: a wrapper around the strategy's aggregate in
this process) which devices' results were accepted, which the defences dropped, and whether the
large model is finite, so "an attacker got into round 0" is a measured fact, not an inference.

    python -m bench.attacks_deployed [--quick]   -> bench/results/attacks_deployed[.quick].json

--quick: digits, 3 devices, 1 attacker (sign-flipped weights), 2 rounds: the same code path
(tests/bench/test_attacks_deployed.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "attacks_deployed"
REPO = Path(__file__).resolve().parents[1]

# attack -> policy overrides of the family it applies to (see the module docstring)
ATTACK_POLICY: dict[str, dict[str, Any]] = {"sign_flip": {}, "onehot_logits": {"teacher": "device_logits"}}
FULL = {"dataset": "fashion-mnist", "devices": 5, "proxy_size": 1000, "train_size": 6000, "test_size": None,
        "rounds": 5, "attacks": ["sign_flip", "onehot_logits"], "malicious": [1, 2]}  # fmt: skip
QUICK = {"dataset": "digits", "devices": 3, "proxy_size": 300, "train_size": None, "test_size": None,
         "rounds": 2, "attacks": ["sign_flip"], "malicious": [1], "policy": {"local_epochs": 2}}  # fmt: skip
DEADLINE_S = 900.0


def _demo_run_class() -> Any:
    from server_app.demo.launcher import DemoRun

    class AttackRun(DemoRun):
        """DemoRun whose first devices are attackers (`attack`) or absent (`attack` None, `absent`)."""

        def __init__(self, cfg: Any, malicious: list[str], attack: str | None, absent: bool):
            super().__init__(cfg)
            self.malicious, self.attack, self.absent = list(malicious), attack, absent
            self.per_round: dict[int, dict[str, Any]] = {}

        def _start_server(self) -> None:
            full = self.cfg.devices
            self.cfg.devices = full - (
                len(self.malicious) if self.absent else 0
            )  # rounds start when all are up
            try:
                super()._start_server()
            finally:
                self.cfg.devices = full
            self._instrument(self.services.orchestrator.strategy)

        def _instrument(self, strategy: Any) -> None:
            import torch

            inner, outer = strategy._aggregate, strategy.aggregate

            def aggregate_inner(round_id: int, results: list[Any]) -> Any:
                rep = inner(round_id, results)
                self.per_round[round_id] = {"accepted": sorted(r.device_id for r in results),
                                            "dropped": sorted(set(getattr(strategy, "_dropped", [])))}  # fmt: skip
                return rep

            def aggregate(round_id: int, results: list[Any]) -> Any:
                try:
                    return outer(round_id, results)
                finally:  # after the gate (which rolls a non-finite model back)
                    finite = all(bool(torch.isfinite(p).all()) for p in strategy.large_model.parameters())
                    self.per_round.setdefault(round_id, {})["large_finite"] = finite

            strategy._aggregate, strategy.aggregate = aggregate_inner, aggregate

        def _start_agents(self) -> None:
            logs = self.run_dir / "logs"
            logs.mkdir(exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **self.cfg.device_env}
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
            for d in self.layout.devices:
                dev = d["device_id"]
                if dev in self.malicious and self.absent:
                    continue
                if dev in self.malicious and self.attack:
                    out = open(logs / f"{dev}.log", "ab")  # noqa: SIM115 - handed to the child process
                    self.agents[dev] = subprocess.Popen(
                        [sys.executable, "-m", "bench.attack_agent", self.attack, "run", "--config", d["config_path"]],
                        stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))  # fmt: skip
                    out.close()
                else:
                    self.start_agent(dev, env=env, log_path=logs / f"{dev}.log")

    return AttackRun


def run_one(
    spec: dict[str, Any], attack: str, kind: str, n_mal: int, seed: int, workdir: Path, progress: bool = False
) -> dict[str, Any]:
    """One deployed run. kind: clean | honest_only | attacked."""
    from server_app.data.prepare import default_labeled_proxy
    from server_app.demo.launcher import DemoConfig
    from server_app.policy import KoalaPolicy
    from server_app.registry import crud

    policy = KoalaPolicy(rounds=spec["rounds"], deadline_s=DEADLINE_S, seed=seed,
                         **spec.get("policy", {}), **ATTACK_POLICY[attack])  # fmt: skip
    devices = spec["devices"]
    malicious = [f"dev{i:03d}" for i in range(n_mal)] if kind != "clean" else []
    labeled = (
        default_labeled_proxy(spec["proxy_size"])
        if spec.get("labeled_proxy") is None
        else spec["labeled_proxy"]
    )
    cfg = DemoConfig(run_dir=str(workdir / f"{attack}-{kind}-{n_mal}of{devices}-s{seed}"), dataset=spec["dataset"],
                     devices=devices, alpha=0.5, proxy_size=spec["proxy_size"], train_size=spec["train_size"],
                     test_size=spec["test_size"], labeled_proxy=labeled, policy=policy, torch_threads=2)  # fmt: skip
    run = _demo_run_class()(
        cfg, malicious, attack if kind == "attacked" else None, absent=kind == "honest_only"
    )
    t0 = time.perf_counter()
    try:
        run.start()
        finished = run.wait(timeout_s=spec["rounds"] * DEADLINE_S + 300, progress=progress)
        res = run.results()
        states = {r.id: r.state for r in run.services.registry.run(crud.list_rounds, limit=1000)}
    finally:
        run.stop()
    wall = time.perf_counter() - t0
    rounds = []
    for r in res["rounds"]:
        rid = r["round"]
        info = run.per_round.get(rid, {})
        used = [d for d in info.get("accepted", []) if d not in info.get("dropped", [])]
        rounds.append({"round": rid, "state": states.get(rid), "large_test_acc": r["large_test_acc"],
                       "accepted": info.get("accepted"), "dropped": info.get("dropped"),
                       "malicious_in_model": [d for d in used if d in malicious and kind == "attacked"],
                       "honest_dropped": [d for d in info.get("dropped", []) if d not in malicious],
                       "large_finite": info.get("large_finite")})  # fmt: skip
    accs = [r["large_test_acc"] for r in rounds]
    final = accs[-1] if accs else None
    return {"attack": attack, "kind": kind, "malicious": n_mal if kind != "clean" else 0, "devices": devices,
            "seed": seed, "acc": final, "finished": finished, "malicious_ids": malicious,
            "rounds_completed": sum(1 for s in states.values() if s == "completed"),
            "failed_rounds": sum(1 for s in states.values() if s in ("failed", "aborted")),
            "nonfinite_models": sum(1 for r in rounds if r["large_finite"] is False)
            + sum(1 for a in accs if a is None or not math.isfinite(a)),
            "labeled_proxy": labeled, "policy": {k: policy.model_dump()[k] for k in
                                                 ("strategy", "teacher", "fusion", "weight_rule", "count_cap",
                                                  "clip_factor", "outlier_factor", "agreement_filter",
                                                  "canary_filter", "rounds", "local_epochs", "rkd_epochs")},
            "rounds": rounds, "wall_s": round(wall, 1)}  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for a in [r for r in runs if r["kind"] == "attacked"]:
        same = [
            r
            for r in runs
            if r["attack"] == a["attack"] and r["devices"] == a["devices"] and r["seed"] == a["seed"]
        ]
        clean = next(r for r in same if r["kind"] == "clean")
        ho = next(r for r in same if r["kind"] == "honest_only" and r["malicious"] == a["malicious"])
        mine = [clean, ho, a]
        rows.append({
            "attack": a["attack"], "malicious": a["malicious"], "devices": a["devices"], "seed": a["seed"],
            "clean_acc": clean["acc"], "honest_only_acc": ho["acc"], "attacked_acc": a["acc"],
            "delta_vs_honest_only_pt": None if None in (a["acc"], ho["acc"]) else round(100 * (a["acc"] - ho["acc"]), 2),
            "delta_vs_clean_pt": None if None in (a["acc"], clean["acc"]) else round(100 * (a["acc"] - clean["acc"]), 2),
            "nonfinite_models": sum(r["nonfinite_models"] for r in mine),
            "failed_rounds": sum(r["failed_rounds"] for r in mine),
            "rounds_with_malicious_in_model": [r["round"] for r in a["rounds"] if r["malicious_in_model"]],
            "malicious_dropped_by_round": {r["round"]: [d for d in (r["dropped"] or []) if d in a["malicious_ids"]]
                                           for r in a["rounds"]},
            "honest_dropped": sum(len(r["honest_dropped"]) for x in mine for r in x["rounds"]),
            "teacher": a["policy"]["teacher"] or "avg_model (default)",
        })  # fmt: skip
    return rows


def run(
    quick: bool = False,
    out: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    labeled_proxy: int | None = None,
    attacks: list[str] | None = None,
    malicious: list[int] | None = None,
    name: str = NAME,
) -> dict[str, Any]:
    """labeled_proxy: None = what `koala data prepare` writes by default; 0 reproduces the path
    before it did (no canary rows). attacks / malicious: a subset of the table; name: the result file."""
    from bench.common import DEFAULT_OUT, table, write_result

    spec = dict(QUICK if quick else FULL)
    spec.update(
        {
            k: v
            for k, v in (("labeled_proxy", labeled_proxy), ("attacks", attacks), ("malicious", malicious))
            if v is not None
        }
    )
    out = out or DEFAULT_OUT
    started, load0 = time.time(), os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="koala-attacks-deployed-") as tmp:
        for attack in spec["attacks"]:
            plan = [("clean", 0)] + [(k, m) for m in spec["malicious"] for k in ("honest_only", "attacked")]
            for kind, n_mal in plan:
                r = run_one(spec, attack, kind, n_mal, seed, Path(tmp), progress=False)
                runs.append(r)
                if progress:
                    print(f"{attack} {kind} {r['malicious']}/{r['devices']}: acc {r['acc']} "
                          f"per round {[x['large_test_acc'] for x in r['rounds']]} failed {r['failed_rounds']} "
                          f"nonfinite {r['nonfinite_models']} malicious in model "
                          f"{[x['malicious_in_model'] for x in r['rounds']]} wall {r['wall_s']} s", flush=True)  # fmt: skip
    rows = summarize(runs)
    print(table(["attack", "mal/dev", "teacher", "clean", "honest only", "attacked", "vs honest only pt", "nonfinite",
                 "failed", "rounds with attacker in model"],
                [[s["attack"], f"{s['malicious']}/{s['devices']}", s["teacher"], s["clean_acc"], s["honest_only_acc"],
                  s["attacked_acc"], s["delta_vs_honest_only_pt"], s["nonfinite_models"], s["failed_rounds"],
                  s["rounds_with_malicious_in_model"] or "-"] for s in rows]))  # fmt: skip
    params = {k: v for k, v in spec.items()}
    params.update({"alpha": 0.5, "seed": seed, "deadline_s": DEADLINE_S, "attack_policy": ATTACK_POLICY,
                   "labeled_proxy": runs[0]["labeled_proxy"] if runs else None, "torch_threads": 2})  # fmt: skip
    return write_result(name, out, quick=quick, params=params, raw={"runs": runs},
                        ratios={f"{s['devices']}/{s['malicious']}/{s['attack']}/delta_vs_honest_only_pt":
                                s["delta_vs_honest_only_pt"] for s in rows},
                        notes=["deployed: private Mosquitto, SQLite registry, the real server, one OS process per device "
                               "(attackers: bench/attack_agent.py, the product agent with its result forged)",
                               "acc: the large model on the server's test set after the last round",
                               "honest_only: the malicious devices' agents never start (their data is lost)",
                               "nonfinite_models / failed_rounds: summed over the row's clean, honest-only and attacked runs",
                               "rounds_with_malicious_in_model: rounds in which an attacker's result was accepted and not "
                               "dropped by a defence (it reached the average / fusion)"],
                        started=started, load_start=load0, rows=rows)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits, 3 devices, 1 attacker, 2 rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-canary",
        action="store_true",
        help="the path before `koala data prepare` labeled proxy rows: 0 labeled rows, sign-flipped "
        "weights, 2 of 5 -> attacks_deployed_no_canary.json",
    )
    a = ap.parse_args(argv)
    if a.no_canary:
        doc = run(
            quick=a.quick,
            seed=a.seed,
            labeled_proxy=0,
            attacks=["sign_flip"],
            malicious=[1] if a.quick else [2],
            name=f"{NAME}_no_canary",
        )
    else:
        doc = run(quick=a.quick, seed=a.seed)
    print(f"-> {doc['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
