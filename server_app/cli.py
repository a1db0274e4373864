"""The `koala` command. Each subcommand lives in `server_app/commands/<name>.py`.

A command module exposes `HELP`, `configure(parser)` and `run(args) -> int`, and imports its heavy
dependencies (torch, FastAPI, ...) only inside `run`, so `koala --help` stays fast and
`koala device ...` works in a device venv that has no server dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "sim": "server_app.commands.sim",
    "demo": "server_app.commands.demo",
    "serve": "server_app.commands.serve",
    "device": "server_app.commands.device",
    "provision": "server_app.commands.provision",
    "monitor": "server_app.commands.monitor",
    "bench": "server_app.commands.bench",
    "data": "server_app.commands.data",
    "zoo": "server_app.commands.zoo",
    "db": "server_app.commands.db",
}


def _available() -> dict[str, object]:
    """Import the command modules that exist; a missing one is skipped, not fatal."""
    found: dict[str, object] = {}
    for name, mod in COMMANDS.items():
        try:
            found[name] = importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # command not built yet, or its module is absent
            if exc.name and mod.startswith(exc.name):
                continue
            raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koala",
        description="KOALA Edge: train a large server model from a fleet of small IoT devices over MQTT.",
    )
    parser.add_argument("--version", action="version", version="koala-edge 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available().items():
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
