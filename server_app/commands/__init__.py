"""Subcommands of `koala` (see server_app.cli for the module convention)."""

from __future__ import annotations

import signal


def stop_on_signals() -> None:
    """Make Ctrl-C and SIGTERM raise KeyboardInterrupt, so long-running commands clean up (stop
    child processes, disconnect) in their `finally`. Also when started with SIGINT ignored: a
    background job of a non-interactive shell (`cmd &` in a script, CI runners) inherits SIG_IGN
    and Python then installs no KeyboardInterrupt handler; SIGTERM by default kills without cleanup."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
