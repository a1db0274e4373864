"""The `koala` command. Each subcommand lives in `server_app/commands/<name>.py` (plumbing shared
with `koala-device` in device_firmware_py.cli).

A command module exposes `HELP`, `configure(parser)` and `run(args) -> int`, and imports its heavy
dependencies (torch, FastAPI, ...) only inside `run`, so `koala --help` stays fast and
`koala device ...` works in a device venv that has no server dependencies.
"""

from __future__ import annotations

import argparse
import sys

from device_firmware_py.cli import command_parser, dispatch

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


def build_parser() -> argparse.ArgumentParser:
    return command_parser(
        "koala", "KOALA Edge: train a large server model from a fleet of small IoT devices over MQTT.", COMMANDS,
        version="koala-edge 0.1.0",
    )


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
