"""`koala monitor`: watch devices and rounds live over MQTT (read-only; one line per message)."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "watch device and round events on the broker (one line each, or --json)"


def _default_broker() -> str:
    """KOALA_BROKER_URL, else the server Settings' broker URL when they load, else localhost."""
    env = os.environ.get("KOALA_BROKER_URL")
    if env:
        return env
    try:
        from server_app.config import load_settings

        url = getattr(load_settings(), "broker_url", None)
        if url:
            return str(url)
    except Exception:  # no settings file / config module: the local default is right for a dev box
        pass
    return "mqtt://127.0.0.1:1883"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=None, help="mqtt://[user:pass@]host[:port] or mqtts://... (default: KOALA_BROKER_URL, settings, mqtt://127.0.0.1:1883)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument(
        "--topics",
        nargs="+",
        metavar="T",
        help="groups (status progress results rounds server all) or raw MQTT filters; default: all groups but 'all'",
    )
    p.add_argument("--username", help="broker user (overrides the URL's)")
    p.add_argument("--password", help="broker password (prefer KOALA_MONITOR_PASSWORD)")
    p.add_argument("--ca-file", help="CA certificate for mqtts://")
    p.add_argument("--count", type=int, default=None, help="exit after N messages")
    p.add_argument("--timeout", type=float, default=None, help="exit after S seconds")


def run(args: argparse.Namespace) -> int:
    from server_app.commands import stop_on_signals
    from server_app.monitor import Monitor, format_line, subscriptions, to_json

    try:
        filters = subscriptions(args.topics)
    except ValueError as exc:
        print(f"koala monitor: {exc}", file=sys.stderr)
        return 2
    broker = args.broker or _default_broker()

    def emit(rec: dict) -> None:
        print(to_json(rec) if args.json else format_line(rec), flush=True)

    password = args.password if args.password is not None else os.environ.get("KOALA_MONITOR_PASSWORD")
    try:
        mon = Monitor(broker, filters, emit, username=args.username, password=password, ca_file=args.ca_file, count=args.count)
    except ValueError as exc:
        print(f"koala monitor: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"# koala monitor {mon.address} " + " ".join(f for f, _ in filters), file=sys.stderr, flush=True)
    stop_on_signals()
    try:
        mon.run(args.timeout)
    except KeyboardInterrupt:
        return 0
    except ConnectionError as exc:
        print(f"koala monitor: {exc}", file=sys.stderr)
        return 1
    return 0

