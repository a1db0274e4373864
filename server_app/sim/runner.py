"""Runs every method of a SimConfig on the same data, partition, proxy set and initial large
model; collects per-round metrics, resource/communication numbers, and writes JSON + PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from server_app.sim.config import MethodSpec, SimConfig


def _small_factory(input_shape: tuple[int, int, int]):
    from device_firmware_py.runtime.manifest import format_input
    from device_firmware_py.runtime.small_model import SmallModel

    return lambda arch: SmallModel(f"{arch}_{format_input(input_shape)}", num_threads=1)


def run_method(cfg: SimConfig, spec: MethodSpec, ds, split, progress: bool = True,
               fleet_factory: Any = None) -> dict[str, Any]:
    """One method end to end; returns {"row": summary, "curve": per-round metrics}.

    `fleet_factory`: called like `InMemoryFleet(devices, proxy_x, model_factory=, simulators=,
    progress=)` instead of it (bench/attacks.py makes chosen devices malicious this way)."""
    import torch

    from server_app.data.prepare import canary_labels
    from server_app.engine.fleet import InMemoryFleet, SimDevice
    from server_app.engine.rounds import run_rounds
    from server_app.engine.strategies import KoalaStrategy, build_strategy
    from server_app.models.flops import resource_summary
    from server_app.models.large import accuracy, build_large_model, resolve_device

    torch.set_num_threads(cfg.torch_threads)
    policy = spec.policy(cfg.policy, cfg.homo_arch, cfg.hetero_archs)
    torch.manual_seed(policy.seed)
    shape = ds.input_shape
    factory = _small_factory(shape)
    proxy_x = ds.x_train[split.proxy_indices]
    labels = canary_labels(ds.y_train[split.proxy_indices], cfg.labeled_proxy, cfg.seed) if cfg.labeled_proxy else None
    archs = list(policy.archs)
    devices = [
        SimDevice(f"dev{i:03d}", archs[i % len(archs)], ds.x_train[idx], ds.y_train[idx], ds.num_classes)
        for i, idx in enumerate(split.device_indices)
    ]
    large = build_large_model(policy.large, shape, ds.num_classes, policy.seed).to(resolve_device(cfg.device))
    strategy = build_strategy(policy, large=large, proxy_x=proxy_x, small_factory=factory, proxy_labels=labels,
                              strict_fields=set(spec.overrides) - {"strategy", "archs"})  # fmt: skip
    uses_proxy = isinstance(strategy, KoalaStrategy)
    bar = None
    if progress:
        from tqdm import tqdm

        per_round = strategy.sampler.count(len(devices))
        bar = tqdm(total=cfg.rounds * per_round, desc=spec.name, unit="dev", leave=True)
    fleet = (fleet_factory or InMemoryFleet)(devices, proxy_x if uses_proxy else None, model_factory=lambda a, s: factory(a),
                          simulators=strategy.device_simulators(), progress=(bar.update if bar else None))  # fmt: skip
    rng = np.random.default_rng(cfg.seed + 1)
    n_test = len(ds.y_test)
    sub = rng.permutation(n_test)[: cfg.eval_samples] if cfg.eval_samples else np.arange(n_test)
    small_sub = rng.permutation(n_test)[: cfg.small_eval_samples]
    has_large = strategy.large_model is not None and policy.strategy != "local_only"

    def evaluate(r: int) -> dict[str, Any]:
        # every round on the same sample (comparable along the curve); the last one also on the
        # full test set (`large_test_acc_full`, the number tables report)
        out: dict[str, Any] = {"round": r}
        out["large_test_acc"] = accuracy(strategy.large_model, ds.x_test[sub], ds.y_test[sub]) if has_large else None
        if has_large:
            out["large_finite"] = bool(all(torch.isfinite(q).all() for q in strategy.large_model.state_dict().values()
                                           if q.is_floating_point()))  # fmt: skip
        if has_large and r == cfg.rounds - 1:
            out["large_test_acc_full"] = (out["large_test_acc"] if len(sub) == n_test
                                          else accuracy(strategy.large_model, ds.x_test, ds.y_test))  # fmt: skip
        if policy.strategy != "fedavg_large":
            accs = fleet.evaluate_devices(ds.x_test[small_sub], ds.y_test[small_sub])
            out["small_test_acc_mean"] = float(np.mean(list(accs.values()))) if accs else None
            # the best device model: hetero KOALA's strongest own teacher when devices keep their models
            out["small_test_acc_max"] = float(max(accs.values())) if accs else None
            gw = strategy.global_small_weights()
            if gw:
                g = {}
                for arch, w in gw.items():
                    m = factory(arch)
                    m.set_weights(w)
                    g[arch] = m.evaluate(ds.x_test[small_sub], ds.y_test[small_sub])
                out["global_small_test_acc"] = g
        return out

    def on_report(rep) -> None:
        if bar is not None:
            acc = rep.metrics.get("large_test_acc") or rep.metrics.get("small_test_acc_mean") or 0.0
            bar.set_postfix(round=rep.round_id, acc=f"{acc:.4f}")

    t0 = time.perf_counter()
    reports = run_rounds(strategy, fleet, cfg.rounds, evaluate=evaluate, progress=on_report, record_rejected=True)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    curve = [dict(rep.metrics) for rep in reports]
    last = curve[-1]
    large_res = resource_summary(large, shape)
    mans = [factory(a).manifest.raw for a in archs]
    dev_bytes: float  # one device's model: the large model's ints, or a mean over the archs
    dev_flops: float
    dev_params: float
    if policy.strategy == "fedavg_large":
        dev_bytes, dev_flops, dev_params = large_res["float_bytes"], large_res["train_flops_per_sample"], large_res["param_count"]
    else:
        # mean over the devices (hetero: archs assigned round-robin)
        per_dev = [mans[i % len(archs)] for i in range(len(devices))]
        dev_bytes = float(np.mean([m["float_bytes"] for m in per_dev]))
        dev_flops = float(np.mean([m["train_flops_per_sample"] for m in per_dev]))
        dev_params = float(np.mean([m["param_count"] for m in per_dev]))
    row = {
        "method": spec.name, "strategy": policy.strategy, "policy": policy.model_dump(mode="json"),
        "mode": getattr(strategy, "mode", "baseline"), "archs": archs, "rounds": cfg.rounds,
        "large_test_acc": last.get("large_test_acc_full", last.get("large_test_acc")), "small_test_acc_mean": last.get("small_test_acc_mean"),
        "global_small_test_acc": last.get("global_small_test_acc"),
        "device_param_count": dev_params, "device_param_bytes": dev_bytes, "device_train_flops_per_sample": dev_flops,
        "large_param_bytes": large_res["float_bytes"], "large_train_flops_per_sample": large_res["train_flops_per_sample"],
        "bytes_up_per_device_round": float(np.mean([c["bytes_up_per_device"] for c in curve])),
        "bytes_down_per_device_round": float(np.mean([c["bytes_down_per_device"] for c in curve])),
        "wall_s": wall,
    }  # fmt: skip
    return {"row": row, "curve": curve}


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    return o


def add_reductions(rows: list[dict[str, Any]]) -> None:
    """Paper terms, `1 - small/large`, against the FedAvg-large row of the same run if present."""
    ref = next((r for r in rows if r["strategy"] == "fedavg_large"), None)
    if ref is None:
        return
    for r in rows:
        r["storage_reduction_vs_fedavg_large"] = 1 - r["device_param_bytes"] / ref["device_param_bytes"]
        r["flops_reduction_vs_fedavg_large"] = 1 - r["device_train_flops_per_sample"] / ref["device_train_flops_per_sample"]
        r["uplink_reduction_vs_fedavg_large"] = 1 - r["bytes_up_per_device_round"] / ref["bytes_up_per_device_round"]
        if r["large_test_acc"] is not None and ref["large_test_acc"] is not None:
            r["large_acc_gap_vs_fedavg_large"] = r["large_test_acc"] - ref["large_test_acc"]


def run_experiment(cfg: SimConfig, progress: bool = True, write: bool = True) -> dict[str, Any]:
    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split

    ds = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    split = make_federated_split(ds.y_train, cfg.devices, cfg.proxy_size, cfg.seed, cfg.alpha, cfg.min_samples, cfg.train_size)
    rows, curves = [], {}
    out_dir = Path(cfg.out)
    for spec in cfg.method_specs():
        res = run_method(cfg, spec, ds, split, progress)
        rows.append(res["row"])
        curves[spec.name] = res["curve"]
        add_reductions(rows)
        if write:
            _write(out_dir, cfg, rows, curves)
    return {"rows": _jsonable(rows), "curves": _jsonable(curves), "config": cfg.to_dict(),
            "partition": {"device_sizes": [int(len(i)) for i in split.device_indices], "proxy": int(len(split.proxy_indices))}}  # fmt: skip


def _write(out_dir: Path, cfg: SimConfig, rows, curves) -> None:
    from server_app.sim.plot import plot_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(_jsonable(rows), indent=1))
    (out_dir / "curves.json").write_text(json.dumps({"config": cfg.to_dict(), "curves": _jsonable(curves)}, indent=1))
    plot_curves(curves, out_dir / "accuracy.png", f"{cfg.dataset}: {cfg.devices} devices, alpha={cfg.alpha}, proxy={cfg.proxy_size}")
