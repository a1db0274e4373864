"""`koala zoo`: build and list the small-model LiteRT artifacts devices train on.

`koala zoo build` needs TensorFlow (extra `export`) and is imported only inside run();
`koala zoo list` reads the committed manifests and needs nothing but the device runtime.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "build (TensorFlow, extra 'export') or list the small-model .tflite artifacts"


def configure(p: argparse.ArgumentParser) -> None:
    from server_app.zoo.archs import ARCHS

    sub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="(re)build artifacts deterministically (seeded)")
    b.add_argument("--arch", action="append", choices=sorted(ARCHS), help="repeatable; default: all")
    b.add_argument("--input", action="append", help="HxWxC, repeatable; default: 28x28x1, 32x32x3, 8x8x1")
    b.add_argument("--num-classes", type=int, default=10)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default=None, help="output folder (default: the packaged device_firmware_py/artifacts)")
    bn = sub.add_parser("bench", help="Fashion-MNIST accuracy (float vs int8) + step time after N on-device steps")
    bn.add_argument("--arch", action="append", choices=sorted(ARCHS), help="repeatable; default: all")
    bn.add_argument("--input", action="append", help="HxWxC, repeatable; default: 28x28x1, 32x32x3")
    bn.add_argument("--steps", type=int, default=2000)
    bn.add_argument("--lr", type=float, default=1e-3)
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--calibration", type=int, default=256, help="int8 calibration samples (training data)")
    bn.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    bn.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    ls = sub.add_parser("list", help="list architectures and the built artifacts with their costs")
    ls.add_argument("--dir", default=None, help="artifact folder (default: packaged)")
    ls.add_argument("--json", action="store_true", help="print manifests' summaries as JSON")


def _build(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from server_app.zoo.archs import ARCHS, DEFAULT_INPUTS, parse_input

    try:
        from server_app.zoo.builder import build
    except ImportError as exc:
        print(f"koala zoo build needs TensorFlow (pip install 'koala-edge[export]'): {exc}", file=sys.stderr)
        return 1
    from device_firmware_py.runtime.manifest import ARTIFACTS_DIR

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out) if args.out else ARTIFACTS_DIR
    archs = args.arch or list(ARCHS)
    inputs = [parse_input(s) for s in args.input] if args.input else list(DEFAULT_INPUTS)
    for arch in archs:
        for shape in inputs:
            m = build(arch, shape, out, num_classes=args.num_classes, seed=args.seed)
            print(f"{m['name']}: {m['param_count']} params, {m['tflite_file_bytes']} B train file, "
                  f"{m['int8_bytes']} B int8 -> {out}")  # fmt: skip
    return 0


def _list(args: argparse.Namespace) -> int:
    from device_firmware_py.runtime.manifest import list_manifests
    from server_app.zoo.archs import ARCH_HELP

    manifests = list_manifests(args.dir)
    if args.json:
        print(json.dumps([m.summary() for m in manifests], indent=1))
        return 0
    for name, text in ARCH_HELP.items():
        print(f"{name:15s} {text}")
    print()
    print(f"{'artifact':24s} {'params':>7s} {'float B':>8s} {'int8 B':>7s} {'file B':>8s} {'fwd FLOP':>10s} {'train FLOP':>11s}")
    for m in manifests:
        s = m.summary()
        print(f"{s['name']:24s} {s['param_count']:7d} {s['float_bytes']:8d} {s['int8_bytes']:7d} "
              f"{s['tflite_file_bytes']:8d} {s['forward_flops_per_sample']:10d} {s['train_flops_per_sample']:11d}")  # fmt: skip
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from server_app.zoo.archs import ARCHS, parse_input
    from server_app.zoo.bench import bench_one, load_fmnist, markdown

    data = load_fmnist(Path(args.data_dir))
    inputs = [parse_input(s) for s in args.input] if args.input else [(28, 28, 1), (32, 32, 3)]
    rows = []
    for shape in inputs:
        for arch in args.arch or list(ARCHS):
            rows.append(bench_one(arch, shape, data, args.steps, args.lr, args.seed, args.calibration))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"build": _build, "bench": _bench, "list": _list}[args.zoo_command](args)
