"""The `koala-device` command (also `koala device ...`), and the subcommand plumbing `koala` reuses.

A command module exposes `HELP`, `configure(parser)` and `run(args) -> int`, and imports its heavy
dependencies only inside `run`, so `--help` stays fast and a missing optional module only hides
its command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


class CommandError(Exception):
    """A failure the user can fix: `str(exc)` says what failed and what to do, in one or two lines.
    `dispatch` prints it without a traceback (the traceback only with `--debug`) and exits 1."""


# name -> module exposing HELP, configure(parser), run(args) -> int
COMMANDS: dict[str, str] = {
    "run": "device_firmware_py.agent.command",
    "check": "device_firmware_py.agent.check",
    "info": "device_firmware_py.runtime.command",
    "predict": "device_firmware_py.serving.predict_command",
    "feed": "device_firmware_py.serving.feed_command",
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
    """Parse and run the chosen command; no command prints the help (exit 2).

    A failure is one or two lines on stderr and a non-zero exit: a `CommandError` as written, any
    other exception as its type and first line plus a pointer to `--debug`, which re-raises (full
    traceback). Output piped into a reader that quits early (`| head`) ends quietly."""
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get("KOALA_DEBUG", "") not in ("", "0")
    where = f"{parser.prog} {args.command}"
    try:
        rc = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return rc
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except CommandError as exc:
        if debug:
            raise
        print(f"{where}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"{where}: {type(exc).__name__}{': ' + first if first else ''}\n"
              f"  (unexpected; `{parser.prog} --debug {args.command} ...` prints the traceback)", file=sys.stderr)  # fmt: skip
        return 1


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush raises nothing."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):  # stdout is no real file (pytest capture)
        pass


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="on a failure, print the full traceback (default: one or two lines); also KOALA_DEBUG=1")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("koala-device", "KOALA Edge device agent.", COMMANDS)
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
