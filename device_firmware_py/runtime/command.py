"""`koala-device info`: show the packaged small-model artifacts (or one) and their costs."""

from __future__ import annotations

import argparse
import json

HELP = "print small-model artifact manifests (params, bytes, FLOPs, signatures)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="e.g. cnn_small (default: all)")
    p.add_argument("--input", help="HxWxC, e.g. 28x28x1 (default: all)")
    p.add_argument("--dir", help="artifact folder (default: the packaged one)")
    p.add_argument("--full", action="store_true", help="whole manifests, incl. weight shapes and patch table")


def run(args: argparse.Namespace) -> int:
    from device_firmware_py.runtime.interpreter import RUNTIME
    from device_firmware_py.runtime.manifest import list_manifests

    ms = list_manifests(args.dir)
    if args.arch:
        ms = [m for m in ms if m.arch == args.arch]
    if args.input:
        want = [int(v) for v in args.input.lower().split("x")]
        ms = [m for m in ms if list(m.input_shape) == want]
    if not ms:
        print("no matching artifact")
        return 1
    rows = [m.raw if args.full else m.summary() for m in ms]
    print(json.dumps({"runtime": RUNTIME, "artifacts": rows}, indent=1))
    return 0
