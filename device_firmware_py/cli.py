"""The `koala-device` command (also `koala device ...`). Subcommands are added by the agent module."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing HELP, configure(parser), run(args) -> int
COMMANDS: dict[str, str] = {
    "run": "device_firmware_py.agent.command",
    "info": "device_firmware_py.runtime.command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koala-device", description="KOALA Edge device agent.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in COMMANDS.items():
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and mod.startswith(exc.name):
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
