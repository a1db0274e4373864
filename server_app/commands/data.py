"""`koala data info` (what a data set looks like here) and `koala data prepare` (the proxy, test and
per-device files a fleet runs on, see server_app.data.prepare)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "inspect data sets and write a fleet's proxy, test and per-device data files"


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", metavar="SUBCOMMAND")
    info = sub.add_parser("info", help="shapes, sizes and label counts of a data set")
    info.add_argument("--dataset", default="digits", help="digits | fashion-mnist | mnist | cifar10")
    info.add_argument("--data-dir", default=None, help="directory with IDX files / CIFAR-10 python batches")
    info.add_argument("--devices", type=int, default=None, help="also show a partition over this many devices")
    info.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha for --devices (<=0: IID)")
    info.add_argument("--proxy-size", type=int, default=0)
    info.add_argument("--seed", type=int, default=0)

    prep = sub.add_parser(
        "prepare", help="write proxy.npz, test.npz and devices/<id>.npz for a fleet",
        description="Split a data set for a fleet: OUT/proxy.npz (unlabeled proxy inputs, for the server's "
        "paths.data_dir and every device), OUT/test.npz (the server's test set), OUT/devices/<id>.npz (each "
        "device's private data, Dirichlet(alpha) label skew) and OUT/data.json (what was written).",
    )  # fmt: skip
    prep.add_argument("--dataset", default="fashion-mnist", help="digits | fashion-mnist | mnist | cifar10")
    prep.add_argument("--data-dir", default=None, help="directory with IDX files / CIFAR-10 python batches")
    who = prep.add_mutually_exclusive_group(required=True)
    who.add_argument("--manifest", type=Path, help="take the device ids from this fleet manifest")
    who.add_argument("--devices", help="device ids, comma-separated (pi-01,pi-02) or a count (20 -> dev000..)")
    prep.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (<=0: IID)")
    prep.add_argument("--proxy-size", type=int, default=1000, help="proxy images taken out of the training set")
    prep.add_argument("--labeled-proxy", type=int, default=None,
                      help="also write proxy_labels.npz: the labels of this many proxy rows, which the server uses "
                           "to judge devices (policy canary_filter) and never sends (default: 10%% of the proxy, "
                           "at least 30; 0: none, and round 0 is then judged by update norms alone)")
    prep.add_argument("--train-size", type=int, default=None, help="use only this many training images in total")
    prep.add_argument("--test-size", type=int, default=None, help="server test images (default: the whole test set)")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--out", type=Path, required=True, help="directory to write (the server's paths.data_dir)")


def _device_ids(args: argparse.Namespace) -> list[str]:
    from server_app.provisioning.identity import check_device_id

    if args.manifest is not None:
        from server_app.provisioning.manifest import load_manifest

        return [d.id for d in load_manifest(args.manifest).devices]
    spec = args.devices.strip()
    if spec.isdigit():
        return [f"dev{i:03d}" for i in range(int(spec))]
    return [check_device_id(d.strip()) for d in spec.split(",") if d.strip()]


def _prepare(args: argparse.Namespace) -> int:
    from server_app.data.prepare import default_labeled_proxy, prepare_data
    from server_app.provisioning.identity import InvalidDeviceId
    from server_app.provisioning.manifest import ManifestError

    try:
        ids = _device_ids(args)
        data, _order, _ds = prepare_data(
            args.out, dataset=args.dataset, device_ids=ids, alpha=args.alpha if args.alpha > 0 else None,
            proxy_size=args.proxy_size, seed=args.seed, train_size=args.train_size, test_size=args.test_size,
            data_dir=args.data_dir,
            labeled_proxy=default_labeled_proxy(args.proxy_size) if args.labeled_proxy is None else args.labeled_proxy,
        )  # fmt: skip
    except (FileNotFoundError, ManifestError, InvalidDeviceId, ValueError) as exc:
        print(f"koala data prepare: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    summary = data.save()
    width = max(len("device"), *(len(d["device_id"]) for d in data.devices))
    print(f"[data] {data.dataset}: proxy {data.proxy_size} images -> {data.proxy_path} (sha256 {data.proxy_sha256[:12]}...)")
    if data.proxy_labels_path:
        print(f"[data] labels of {data.proxy_labeled} proxy rows -> {data.proxy_labels_path} (server only)")
    print(f"[data] test {data.test_size} images -> {data.test_path}")
    print(f"{'device':<{width}}  {'images':>6}  top classes (count)")
    for d in data.devices:
        top = sorted(range(len(d["label_counts"])), key=lambda c: -d["label_counts"][c])[:3]
        print(f"{d['device_id']:<{width}}  {d['n']:>6}  " + ", ".join(f"{c} ({d['label_counts'][c]})" for c in top))
    print(f"[data] wrote {summary}; point the server at it with paths.data_dir={data.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "data_cmd", None) == "prepare":
        return _prepare(args)
    if getattr(args, "data_cmd", None) != "info":
        print("usage: koala data {info,prepare} ... (koala data --help)")
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
