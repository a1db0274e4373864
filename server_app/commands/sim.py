"""`koala sim`: run KOALA and baselines in simulation from a config file and/or flags."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "simulate KOALA / FedAvg baselines on a real data set with LiteRT devices in-process"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment file (.json, .toml, .yaml) with a `policy` section "
                   "(server_app.policy.KoalaPolicy, the same as koala serve's); flags override it")
    p.add_argument("--policy", help="KOALA policy file (the same file koala serve/demo --policy read): the base "
                   "policy of every method, over the config file's")
    p.add_argument("--dataset", help="digits | fashion-mnist | mnist | cifar10")
    p.add_argument("--data-dir")
    p.add_argument("--devices", type=int)
    p.add_argument("--alpha", type=float, help="Dirichlet alpha (<=0: IID)")
    p.add_argument("--proxy-size", type=int)
    p.add_argument("--labeled-proxy", type=int, help="proxy rows whose labels the server knows (policy canary_filter)")
    p.add_argument("--train-size", type=int, help="cap on device training samples")
    p.add_argument("--rounds", type=int)
    p.add_argument("--methods", help="comma-separated presets, e.g. fedavg_large,koala_homo,koala_hetero")
    p.add_argument("--homo-arch")
    p.add_argument("--hetero-archs", help="comma-separated, e.g. mlp_tiny,cnn_small,mobilenet_micro")
    p.add_argument("--seed", type=int)
    p.add_argument("--temperature", "-T", type=float)
    p.add_argument("--local-epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--rkd-epochs", type=int)
    p.add_argument("--fkd-epochs", type=int)
    p.add_argument("--proxy-per-round", type=int, help="proxy images per round (0: all)")
    p.add_argument("--participants", type=float, help="devices per round: count (>=1) or fraction (<1)")
    p.add_argument("--fusion", help="fusion rule of the base policy (mean, weighted, entropy, median, ...)")
    p.add_argument("--width", type=int, help="large model width")
    p.add_argument("--device", help="torch device of the large model: cpu (default), cuda, cuda:N, auto")
    p.add_argument("--out", help="output directory (results.json, curves.json, accuracy.png)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-methods", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from device_firmware_py.cli import CommandError
    from server_app.commands import describe_validation, stop_on_signals
    from server_app.sim.config import PRESETS, load_config
    from server_app.sim.runner import run_experiment

    if args.list_methods:
        for name, (opts, archs) in PRESETS.items():
            print(f"{name:24s} archs={archs} policy={opts}")
        return 0
    over = {
        "dataset": args.dataset, "data_dir": args.data_dir, "devices": args.devices,
        "proxy_size": args.proxy_size, "labeled_proxy": args.labeled_proxy, "train_size": args.train_size,
        "rounds": args.rounds,
        "homo_arch": args.homo_arch, "seed": args.seed, "temperature": args.temperature,
        "local_epochs": args.local_epochs, "lr": args.lr, "rkd_epochs": args.rkd_epochs,
        "fkd_epochs": args.fkd_epochs, "out": args.out, "device": args.device,
        "participants": args.participants, "fusion": args.fusion,
    }  # fmt: skip
    if args.proxy_per_round is not None:
        over["proxy_per_round"] = args.proxy_per_round or None
    if args.alpha is not None:
        over["alpha"] = args.alpha if args.alpha > 0 else None
        if over["alpha"] is None:
            over.pop("alpha")
    if args.methods:
        over["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.hetero_archs:
        over["hetero_archs"] = [a.strip() for a in args.hetero_archs.split(",")]
    if args.width:
        over["large"] = {"width": args.width}
    if over.get("proxy_per_round", 1) is None:  # explicit "all": load_config drops None overrides
        over.pop("proxy_per_round")
        over.setdefault("policy", {})["proxy_per_round"] = None
    if args.policy:
        from server_app.policy import read_policy_file

        over["policy"] = {**read_policy_file(args.policy), **over.get("policy", {})}
    try:
        cfg = load_config(args.config, **over)
    except ValidationError as exc:
        print(f"koala sim: {describe_validation(exc, args, source=args.policy or args.config or '')}", file=sys.stderr)
        return 2
    except ValueError as exc:  # unknown keys / methods in the experiment file
        raise CommandError(str(exc)) from None
    stop_on_signals("koala sim")
    if args.alpha is not None and args.alpha <= 0:
        cfg.alpha = None
    res = run_experiment(cfg, progress=not args.no_progress)
    for r in res["rows"]:
        print(json.dumps({k: r[k] for k in ("method", "large_test_acc", "small_test_acc_mean", "bytes_up_per_device_round", "wall_s")}))
    print(f"wrote {cfg.out}/results.json, curves.json, accuracy.png")
    return 0
