"""Accuracy under attack, in simulation: the large model after 10 rounds with malicious devices vs
the clean run (same seed, same partition, same initial models).

Setup: `koala sim` machinery (`server_app.sim.runner.run_method`) on sklearn digits (8x8x1, 1,348
train / 449 test images), Dirichlet(0.5) label skew, a 300-image proxy set, LiteRT `mlp_tiny`
devices (5 local epochs, lr 3e-3), a narrow LargeCNN (width 8, fc 64; reverse KD batch 32, lr 3e-3),
10 rounds. Two policy families, both KOALA homo:
- "weights": the default policy (teacher avg_model: devices upload small weights, the server
  averages them with `weight_rule` / `clip_factor`);
- "logits": teacher device_logits (devices upload proxy logits, fused with `fusion`).
Fleets: 1 malicious of 5, and 4 of 20 (the first devices of the partition).

Malicious devices live here, not in server code: `AttackFleet` wraps `InMemoryFleet`; honest
devices run unchanged; a malicious one trains (honestly or on flipped labels) and then forges its
result. **The accept decision applies as deployed**: every result (honest or not) goes through the
contract codec and then `rounds.collection.Collection.check` (round, participant, then
`check_result` against the `Expectation` derived from its assignment); a rejected result is dropped
and its reason counted, exactly as the ingestor would. Rounds the model gate refuses are counted as
failed rounds; a large model with a non-finite parameter after a round counts as non-finite.

    python -m bench.attacks [--quick]     -> bench/results/attacks[.quick].json
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

NAME = "attacks"

# attacks a check rejects (the device's result is dropped whatever the rule): run under the default only
REJECTED = ("scaled_1e36", "scaled_1e6", "histogram_lie", "stale_version", "extra_tensor", "replay")
# attacks that pass the checks (honest-format): they are what the robust rules are for
ACCEPTED = {"weights": ("sign_flip", "random_weights", "label_flip", "inflated_count"),
            "logits": ("random_logits", "onehot_logits", "constant_logits", "label_flip", "inflated_count")}  # fmt: skip
# robust settings compared per family (name -> policy overrides)
SETTINGS = {
    "weights": {"undefended": {"weight_rule": "fedavg", "clip_factor": None, "count_cap": None, "agreement_filter": None,
                               "canary_filter": None, "outlier_factor": None},
                "default": {},
                "no_canary": {"canary_filter": None},
                "median": {"weight_rule": "median"},
                "cosine": {"weight_rule": "cosine"},
                "trimmed_mean": {"weight_rule": "trimmed_mean"}},
    # default fusion: class_aware (self-reported label histograms, capped like counts); "entropy"
    # was the default until 2026-12-04 (one-hot 4 of 20 without canary rows: 29.7 % vs 69.3 %)
    "logits": {"undefended": {"fusion": "entropy", "count_cap": None, "agreement_filter": None, "canary_filter": None},
               "default": {},
               "no_canary": {"canary_filter": None},
               "trimmed_mean": {"fusion": "trimmed_mean"}, "agreement": {"fusion": "agreement"},
               "entropy": {"fusion": "entropy"},
               "entropy_no_canary": {"fusion": "entropy", "canary_filter": None}},
}  # fmt: skip
FAMILY = {"weights": {}, "logits": {"teacher": "device_logits"}}
BASE = {"archs": ["mlp_tiny"], "rounds": 10, "local_epochs": 5, "lr": 3e-3, "proxy_per_round": 300, "rkd_batch": 32,
        "rkd_lr": 3e-3, "large": {"width": 8, "options": {"fc": 64}}}  # fmt: skip
INFLATED = 1_000_000  # samples an inflating attacker claims (histogram consistent with it)
# proxy rows whose labels the server knows (10 % of the 300-image proxy: what an operator labels by
# hand); the policy's canary_filter judges devices by them, settings without it ignore them
LABELED_PROXY = 30


def make_attack_fleet(attack: str, malicious: set[str], log: Counter[str], seed: int):
    """An InMemoryFleet factory whose `malicious` devices mount `attack`; every result is put
    through the deployed accept decision, rejections counted in `log` by reason."""
    from device_firmware_py.contract import codec
    from device_firmware_py.contract.errors import ContractError
    from device_firmware_py.task import execute_assignment
    from server_app.engine.fleet import InMemoryFleet
    from server_app.engine.types import Assignment, Result
    from server_app.rounds.collection import Collection, Expectation

    class AttackFleet(InMemoryFleet):
        def __init__(self, *args: Any, **kw: Any):
            super().__init__(*args, **kw)
            self.rng = np.random.default_rng([seed, 4242])
            self.first: dict[str, Any] = {}  # device -> its first accepted result (for replay)

        def _forge(self, a: Any) -> bytes:
            d = self._devices[a.device_id]
            c = d.num_classes
            a = codec.decode_frame(codec.encode_frame(a), Assignment)
            y = (c - 1 - d.y) if attack in ("label_flip", "inflated_count") else d.y
            if attack == "replay" and a.device_id in self.first:
                return self.first[a.device_id]
            r = execute_assignment(self.model(a.device_id), d.x, y, self.proxy_x, a)
            if attack == "replay":  # round 0: honest (accepted); from then on, replay it
                frame = codec.encode_frame(r)
                self.first[a.device_id] = frame
                return frame
            w, z = r.weights, r.proxy_logits
            if attack.startswith("scaled_"):
                k = float(attack.split("_")[1])
                w = [x * np.float32(k) for x in w] if w is not None else None
                z = z * np.float32(k) if z is not None else None
            elif attack == "sign_flip":
                w = [-x for x in w] if w is not None else None
                z = -z if z is not None else None
            elif attack == "random_weights":  # random values at each tensor's own scale
                w = [(self.rng.standard_normal(x.shape) * (x.std() + 1e-3)).astype(np.float32) for x in w]
            elif attack == "random_logits":
                z = (self.rng.standard_normal(z.shape) * 50.0).astype(np.float32)
            elif attack == "onehot_logits":  # every proxy image "is a 3", confidently
                z = np.zeros_like(z)
                z[:, 3] = 50.0
            elif attack == "constant_logits":
                z = np.zeros_like(z)
            n, hist = r.num_samples, list(r.label_histogram or [])
            if attack == "inflated_count":
                n = INFLATED
                hist = [INFLATED // c] * c
                hist[0] += INFLATED - sum(hist)
            elif attack == "histogram_lie":  # one lie per round, in turn
                n, hist = [(n, hist[:-1]), (n, None), (n, [h + 1 for h in hist]), (n, [-1, *hist[1:-1], hist[-1] + 1 + hist[0]])][a.round_id % 4]
            mv = a.model_version + 1 if attack == "stale_version" and a.model_version == 0 else a.model_version
            mv = mv - 1 if attack == "stale_version" and a.model_version > 0 else mv
            if attack == "extra_tensor":  # the tensor the plan did not ask for
                if w is None:
                    w = [np.zeros((4, 4), np.float32)]
                else:
                    z = np.zeros((len(self.proxy_x), c), np.float32)
            forged = Result(round_id=r.round_id, device_id=r.device_id, arch=r.arch, num_samples=n, model_version=mv,
                            label_histogram=hist, metrics=r.metrics, proxy_digest=r.proxy_digest, proxy_logits=z,
                            weights=w)  # fmt: skip
            return codec.encode_frame(forged, logits_dtype="float32")  # float32: the server-side checks decide

        def run_round(self, assignments: list[Any], quorum: int | None = None, timeout_s: float | None = None) -> list[Any]:
            if not assignments:
                return []
            rid = assignments[0].round_id
            c = next(iter(self._devices.values())).num_classes
            psize = len(self.proxy_x) if self.proxy_x is not None else 0
            expect = {a.device_id: Expectation.from_assignment(a, num_classes=c, proxy_size=psize, proxy_digest=None)
                      for a in assignments}  # fmt: skip
            col = Collection(rid, expect, deadline=float("inf"))
            out = []
            for a in assignments:
                bad = a.device_id in malicious
                if bad and attack == "absent":  # the reference: attackers that never answer
                    log["malicious:absent"] += 1
                    continue
                try:
                    if bad:
                        r = codec.decode_frame(self._forge(a), Result)
                        if self.progress:
                            self.progress(1)
                    else:
                        r = super().run_round([a])[0]
                    col.check(r)
                except ContractError as exc:
                    log[f"{'malicious' if bad else 'honest'}:{exc.reason}"] += 1
                    continue
                log[f"{'malicious' if bad else 'honest'}:accepted"] += 1
                out.append(r)
            return out

    return AttackFleet


def run_one(ds: Any, split: Any, family: str, setting: str, attack: str, n_mal: int, seed: int) -> dict[str, Any]:
    from server_app.policy import KoalaPolicy
    from server_app.sim.config import MethodSpec, SimConfig
    from server_app.sim.runner import run_method

    overrides = {**FAMILY[family], **SETTINGS[family][setting]}
    policy = KoalaPolicy.model_validate({**BASE, "seed": seed})
    cfg = SimConfig(dataset="digits", devices=len(split.device_indices), alpha=0.5, proxy_size=300, policy=policy,
                    labeled_proxy=LABELED_PROXY,
                    small_eval_samples=100, torch_threads=1, homo_arch="mlp_tiny")  # fmt: skip
    log: Counter[str] = Counter()
    mal = {f"dev{i:03d}" for i in range(n_mal)} if attack != "none" else set()
    t0 = time.perf_counter()
    res = run_method(cfg, MethodSpec(f"{family}/{setting}", overrides, "policy"), ds, split, progress=False,
                     fleet_factory=make_attack_fleet(attack, mal, log, seed))  # fmt: skip
    curve = res["curve"]
    return {"family": family, "setting": setting, "attack": attack, "malicious": len(mal),
            "devices": len(split.device_indices), "seed": seed, "acc": res["row"]["large_test_acc"],
            "nonfinite_models": sum(1 for c in curve if c.get("large_finite") is False),
            "failed_rounds": sum(1 for c in curve if c.get("rejected")),
            "rejections": dict(log), "wall_s": round(time.perf_counter() - t0, 2),
            "policy": {k: v for k, v in res["row"]["policy"].items() if k in ("teacher", "fusion", "weight_rule", "clip_factor", "count_cap", "agreement_filter", "canary_filter", "outlier_factor")}}  # fmt: skip


def policy_defaults() -> dict[str, str]:
    """The setting of each family that KoalaPolicy's defaults run ("default": no overrides)."""
    return {"weights": "default", "logits": "default"}


def run(quick: bool = False, out: Path | None = None, defaults: dict[str, str] | None = None,
        fleets: list[tuple[int, int]] | None = None, settings: list[str] | None = None,
        merge: bool = False, seeds: list[int] | None = None) -> dict[str, Any]:
    """defaults: the setting per family the headline rows use (default: the KoalaPolicy defaults).
    fleets / settings: run only these (devices, malicious) fleets and setting names; merge: keep the
    stored result's other runs (each run row carries the commit it was measured at)."""
    import torch

    from bench.common import DEFAULT_OUT, git_sha
    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split

    torch.set_num_threads(1)
    started, load0 = time.time(), os.getloadavg()
    out = out or DEFAULT_OUT
    dflt = defaults or policy_defaults()
    seeds = seeds or ([0] if quick else [0, 1, 2, 3])
    fleets = fleets or ([(5, 1)] if quick else [(5, 1), (20, 4)])
    raw: list[dict[str, Any]] = []
    sha = git_sha()
    for seed in seeds:
        ds = load_dataset("digits", seed=seed)
        for n_dev, n_mal in fleets:
            split = make_federated_split(ds.y_train, n_dev, 300, seed, 0.5, 10, None)
            for family in ("weights", "logits"):
                names = [dflt[family]] if quick else list(SETTINGS[family])
                for setting in [n for n in names if settings is None or n in settings]:
                    rejected = REJECTED if setting == dflt[family] else ()  # a check drops them whatever the rule
                    for attack in ("none", "absent", *ACCEPTED[family], *rejected):
                        row = run_one(ds, split, family, setting, attack, n_mal, seed)
                        row["git_sha"] = sha
                        raw.append(row)
                        print(f"seed {seed} {n_mal}/{n_dev} {family}/{setting} {attack}: acc {row['acc']:.4f} "
                              f"nonfinite {row['nonfinite_models']} failed {row['failed_rounds']} {row['rejections']}",
                              flush=True)  # fmt: skip
    if merge:
        import json

        stored = out / (f"{NAME}.quick.json" if quick else f"{NAME}.json")
        if stored.exists():
            key = lambda r: (r["devices"], r["family"], r["setting"], r["attack"], r["seed"])  # noqa: E731
            new = {key(r) for r in raw}
            old = json.loads(stored.read_text())["raw"]["runs"]
            raw = [r for r in old if key(r) not in new] + raw
            fleets = sorted({(r["devices"], r["malicious"]) for r in raw if r["attack"] != "none"} | set(fleets))
    return write(raw, quick, out, dflt, seeds, fleets, started, load0)


def write(raw: list[dict[str, Any]], quick: bool, out: Path, dflt: dict[str, str], seeds: list[int],
          fleets: list[tuple[int, int]], started: float, load0: Any) -> dict[str, Any]:
    """Summary rows (mean over seeds, against the clean run of the same fleet, family and setting)."""
    from bench.common import table, write_result

    summary = []
    keys = sorted({(r["devices"], r["malicious"] if r["attack"] != "none" else 0, r["family"], r["setting"], r["attack"]) for r in raw})
    for n_dev, _m, family, setting, attack in keys:
        if attack in ("none", "absent"):
            continue
        rs = [r for r in raw if (r["devices"], r["family"], r["setting"], r["attack"]) == (n_dev, family, setting, attack)]
        cl = [r for r in raw if (r["devices"], r["family"], r["setting"], r["attack"]) == (n_dev, family, setting, "none")]
        # the best any defense can do: the same fleet with the attackers silent (their data lost)
        ab = [r for r in raw if (r["devices"], r["family"], r["setting"], r["attack"]) == (n_dev, family, setting, "absent")]
        rej: Counter[str] = Counter()
        for r in rs:
            rej.update({k: v for k, v in r["rejections"].items() if k.startswith("malicious:") and k != "malicious:accepted"})
        summary.append({"attack": attack, "malicious": rs[0]["malicious"], "devices": n_dev, "family": family,
                        "setting": setting, "default": setting == dflt[family],
                        "clean_acc": float(np.mean([r["acc"] for r in cl])),
                        "attacked_acc": float(np.mean([r["acc"] for r in rs])),
                        "honest_only_acc": float(np.mean([r["acc"] for r in ab])) if ab else None,
                        "nonfinite_models": sum(r["nonfinite_models"] for r in rs) + sum(r["nonfinite_models"] for r in cl),
                        "failed_rounds": sum(r["failed_rounds"] for r in rs) + sum(r["failed_rounds"] for r in cl),
                        "malicious_rejected": dict(rej),
                        "malicious_accepted": sum(r["rejections"].get("malicious:accepted", 0) for r in rs),
                        "honest_rejected": sum(v for r in rs + cl for k, v in r["rejections"].items()
                                               if k.startswith("honest:") and k != "honest:accepted"),
                        "policy": rs[0]["policy"]})  # fmt: skip
        summary[-1]["delta_pt"] = 100 * (summary[-1]["attacked_acc"] - summary[-1]["clean_acc"])
        ho = summary[-1]["honest_only_acc"]
        summary[-1]["delta_vs_honest_only_pt"] = 100 * (summary[-1]["attacked_acc"] - ho) if ho is not None else None
    print(table(["attack", "mal/dev", "family", "setting", "clean", "honest only", "attacked", "delta pt",
                 "vs honest only pt", "nonfinite", "failed", "rejected as"],
                [[s["attack"], f"{s['malicious']}/{s['devices']}", s["family"], s["setting"] + ("*" if s["default"] else ""),
                  s["clean_acc"], s["honest_only_acc"], s["attacked_acc"], s["delta_pt"], s["delta_vs_honest_only_pt"],
                  s["nonfinite_models"], s["failed_rounds"],
                  ",".join(k.split(":")[1] for k in s["malicious_rejected"]) or "-"] for s in summary]))  # fmt: skip
    ratios = {f"{s['devices']}/{s['family']}/{s['setting']}/{s['attack']}/delta_pt": s["delta_pt"] for s in summary}
    ratios.update({f"{s['devices']}/{s['family']}/{s['setting']}/{s['attack']}/delta_vs_honest_only_pt":
                   s["delta_vs_honest_only_pt"] for s in summary if s["delta_vs_honest_only_pt"] is not None})  # fmt: skip
    return write_result(NAME, out, quick=quick,
                        params={"dataset": "digits", "alpha": 0.5, "proxy": 300, "arch": "mlp_tiny", "seeds": seeds,
                                "fleets": fleets, "base_policy": BASE, "families": FAMILY, "settings": SETTINGS,
                                "defaults": dflt, "inflated_count": INFLATED, "labeled_proxy": LABELED_PROXY},
                        raw={"rows": summary, "runs": raw}, ratios=ratios,
                        notes=["accuracy: large model on the full digits test set (449 images) after 10 rounds, mean of seeds",
                               "every result goes through the codec and rounds.collection.Collection.check (as the "
                               "ingestor); rejected results are dropped",
                               "nonfinite_models / failed_rounds: summed over the clean and attacked runs of the row",
                               "honest_only: the same fleet and setting with the malicious devices silent (the best a "
                               "defense can do: their data is lost either way)"],
                        started=started, load_start=load0)  # fmt: skip


def resummarize(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    """Re-write the summary of a stored result (e.g. after a policy default changed) from its runs."""
    import json

    from bench.common import DEFAULT_OUT

    out = out or DEFAULT_OUT
    doc = json.loads((out / (f"{NAME}.quick.json" if quick else f"{NAME}.json")).read_text())
    p = doc["params"]
    return write(doc["raw"]["runs"], quick, out, policy_defaults(), p["seeds"], [tuple(f) for f in p["fleets"]],
                 time.time() - doc["wall_s"], doc["machine"]["loadavg_start"])  # fmt: skip


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="attack suite (koala bench attacks)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resummarize", action="store_true", help="rewrite the summary of the stored runs")
    ap.add_argument("--fleet", action="append", help="DEVICES:MALICIOUS, e.g. 20:4 (repeatable; default all)")
    ap.add_argument("--settings", help="comma-separated setting names (default all)")
    ap.add_argument("--merge", action="store_true", help="keep the stored runs this invocation does not redo")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1,2,3; --quick: 0)")
    a = ap.parse_args()
    if a.resummarize:
        resummarize(quick=a.quick)
    else:
        run(quick=a.quick, fleets=[tuple(int(v) for v in f.split(":")) for f in a.fleet] if a.fleet else None,
            settings=a.settings.split(",") if a.settings else None, merge=a.merge,
            seeds=[int(v) for v in a.seeds.split(",")] if a.seeds else None)
