"""The `koala` command. Each subcommand lives in `server_app/commands/<name>.py` (plumbing shared
with `koala-device` in device_firmware_py.cli).

A command module exposes `HELP`, `configure(parser)` and `run(args) -> int`, and imports its heavy
dependencies (torch, FastAPI, ...) only inside `run`, so `koala --help` stays fast and
`koala device ...` works in a device venv that has no server dependencies.
"""

from __future__ import annotations

import argparse
import sys

from device_firmware_py.cli import add_debug_flag, command_parser, dispatch

# name -> module; order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "sim": "server_app.commands.sim",
    "demo": "server_app.commands.demo",
    "serve": "server_app.commands.serve",
    "device": "server_app.commands.device",
    "provision": "server_app.commands.provision",
    "monitor": "server_app.commands.monitor",
    "rounds": "server_app.commands.rounds",
    "devices": "server_app.commands.devices",
    "models": "server_app.commands.models",
    "bench": "server_app.commands.bench",
    "data": "server_app.commands.data",
    "zoo": "server_app.commands.zoo",
    "db": "server_app.commands.db",
}


# Option spellings accepted as one another everywhere (canonical first): a command that defines
# either name answers to both.
ALIASES: tuple[tuple[str, str], ...] = (("--database-url", "--db"),)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "koala", "KOALA Edge: train a large server model from a fleet of small IoT devices over MQTT.", COMMANDS,
        version="koala-edge 0.1.0",
    )
    add_debug_flag(parser)
    _add_aliases(parser)
    return parser


def _add_aliases(parser: argparse.ArgumentParser) -> None:
    """Give every option spelled one way in ALIASES the other spelling too, in every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_aliases(sub)
            continue
        for a, b in ALIASES:
            for have, add in ((a, b), (b, a)):
                if have in action.option_strings and add not in parser._option_string_actions:
                    action.option_strings = [*action.option_strings, add]  # typeshed: a Sequence
                    parser._option_string_actions[add] = action


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
