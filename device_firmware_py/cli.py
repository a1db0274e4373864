"""The `koala-device` command (also `koala device ...`), and the subcommand plumbing `koala` reuses.

A command module exposes `HELP`, `configure(parser)` and `run(args) -> int`, and imports its heavy
dependencies only inside `run`, so `--help` stays fast and a missing optional module only hides
its command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing HELP, configure(parser), run(args) -> int
COMMANDS: dict[str, str] = {
    "run": "device_firmware_py.agent.command",
    "info": "device_firmware_py.runtime.command",
}


def available(commands: dict[str, str]) -> dict[str, object]:
    """Import the command modules that exist; a missing one (not built, or its extra not installed
    in this venv) is skipped, a broken one raises."""
    found: dict[str, object] = {}
    for name, mod in commands.items():
        try:
            found[name] = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and mod.startswith(exc.name):
                continue
            raise
    return found


def command_parser(prog: str, description: str, commands: dict[str, str], version: str | None = None) -> argparse.ArgumentParser:
    """argparse parser with one subparser per available command module."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if version:
        parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in available(commands).items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)  # type: ignore[attr-defined]
        module.configure(p)  # type: ignore[attr-defined]
        p.set_defaults(_run=module.run)  # type: ignore[attr-defined]
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run the chosen command; no command prints the help (exit 2)."""
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("koala-device", "KOALA Edge device agent.", COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
