"""`koala bench NAME|all [--quick] [--out DIR]`: run the benchmarks in bench/ and write JSON results.

The product's benchmarks are the `bench` package, shipped in the wheel: from a source checkout
this command puts the checkout first on sys.path (its bench/, results in bench/results); from an
installed wheel it runs the installed bench (results in ./koala-bench-results). The experiments in
research/ are not run here. bench is loaded by name at run time, like a plug-in: no module of
server_app imports it (tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "run benchmarks (ingestion, fleet_scale, device_footprint, communication, reverse_kd, parity, attacks, device_class, device_install) -> bench/results"
NAMES = ("ingestion", "fleet_scale", "device_footprint", "communication", "reverse_kd", "parity", "attacks", "device_class",
         "device_install")
_REPO = Path(__file__).resolve().parents[2]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=[*NAMES, "all"], help="benchmark to run, or all")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run, ~1 minute for all); writes NAME.quick.json")
    p.add_argument("--out", default=None,
                   help="results directory (default: bench/results in a source checkout, ./koala-bench-results when installed)")
    p.add_argument("--device", default="cpu",
                   help="torch device for the large model (reverse_kd): cpu, cuda, cuda:N, auto; cuda writes reverse_kd_cuda.json")
    p.add_argument("--profiles-only", action="store_true",
                   help="device_class: run only the link profiles and merge them into the existing device_class.json")
    p.add_argument("--archs-only", action="store_true",
                   help="device_class: run only the architecture rounds and merge them into the existing device_class.json "
                        "(its link profiles kept)")


def run(args: argparse.Namespace) -> int:
    if (_REPO / "pyproject.toml").exists() and str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))  # a source checkout: its bench/, whatever is installed
    import importlib

    try:
        common = importlib.import_module("bench.common")
    except ImportError as exc:
        print(f"koala bench: the bench package is not installed ({exc}); install koala-edge[server] "
              "or run it from a source checkout (git clone ... && scripts/setup.sh)", file=sys.stderr)  # fmt: skip
        return 2

    from server_app.commands import stop_on_signals

    stop_on_signals()  # Ctrl-C / SIGTERM: the benchmarks' finally blocks stop their private brokers

    out = Path(args.out) if args.out else common.DEFAULT_OUT
    names = NAMES if args.name == "all" else (args.name,)
    failed = []
    for name in names:
        print(f"\n## {name}{' (quick)' if args.quick else ''}\n", flush=True)
        t0 = time.perf_counter()
        try:
            kw: dict[str, object] = {"device": args.device} if name == "reverse_kd" else {}
            if name == "device_class" and getattr(args, "profiles_only", False):
                kw["profiles_only"] = True
            if name == "device_class" and getattr(args, "archs_only", False):
                kw["archs_only"] = True
            doc = importlib.import_module(f"bench.{name}").run(quick=args.quick, out=out, **kw)
        except Exception as exc:  # one broken benchmark must not hide the others' results
            failed.append(name)
            print(f"{name} FAILED: {exc!r}", file=sys.stderr)
            continue
        print(f"\n{name}: {time.perf_counter() - t0:.1f} s, load {doc['machine']['loadavg'][0]:.2f} -> {doc['path']}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
