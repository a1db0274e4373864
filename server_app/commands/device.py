"""`koala device ...`: the device agent's commands, delegated to `device_firmware_py.cli`."""

from __future__ import annotations

import argparse

HELP = "run or inspect a device agent (same as the `koala-device` command)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("device_args", nargs=argparse.REMAINDER, help="arguments for koala-device, e.g. run --config FILE")


def run(args: argparse.Namespace) -> int:
    from device_firmware_py.cli import main as device_main

    return device_main(args.device_args)
