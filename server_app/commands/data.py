"""`koala data info`: what a data set looks like here (shapes, sizes, label counts, where from)."""

from __future__ import annotations

import argparse
import json

HELP = "inspect the data sets used by simulations (digits, fashion-mnist, mnist, cifar10)"


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", metavar="SUBCOMMAND")
    info = sub.add_parser("info", help="shapes, sizes and label counts of a data set")
    info.add_argument("--dataset", default="digits", help="digits | fashion-mnist | mnist | cifar10")
    info.add_argument("--data-dir", default=None, help="directory with IDX files / CIFAR-10 python batches")
    info.add_argument("--devices", type=int, default=None, help="also show a partition over this many devices")
    info.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha for --devices (<=0: IID)")
    info.add_argument("--proxy-size", type=int, default=0)
    info.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "data_cmd", None) != "info":
        print("usage: koala data info [--dataset NAME] [--data-dir DIR] [--devices N --alpha A --proxy-size P]")
        return 2
    from server_app.data.datasets import load_dataset
    from server_app.data.partition import make_federated_split

    try:
        ds = load_dataset(args.dataset, args.data_dir, seed=args.seed)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 1
    out = ds.summary()
    out["x_range"] = [float(ds.x_train.min()), float(ds.x_train.max())]
    if args.devices:
        alpha = args.alpha if args.alpha and args.alpha > 0 else None
        split = make_federated_split(ds.y_train, args.devices, args.proxy_size, args.seed, alpha)
        out["partition"] = {
            "alpha": alpha, "proxy": int(len(split.proxy_indices)),
            "device_sizes": [int(len(i)) for i in split.device_indices],
        }  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0
