"""`koala monitor`: watch devices and rounds live over MQTT (read-only; one line per message)."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "watch device and round events on the broker (one line each, or --json)"


def _default_broker() -> str:
    """KOALA_BROKER_URL, else the server Settings' broker URL when a settings file or KOALA_BROKER__URL
    names one, else the newest live demo's broker (./demo_runs/*/run.json, said on stderr), else localhost."""
    env = os.environ.get("KOALA_BROKER_URL")
    if env:
        return env
    if not (os.environ.get("KOALA_CONFIG") or os.environ.get("KOALA_BROKER__URL")):
        from server_app.demo.run_file import live_run

        run = live_run()
        if run is not None and run.get("broker_url"):
            print(f"# using the broker of the demo running in {run['run_dir']} (--broker URL for another)",
                  file=sys.stderr)  # fmt: skip
            return str(run["broker_url"])
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
    p.add_argument("--password", help="broker password (prefer --password-file or KOALA_MONITOR_PASSWORD)")
    p.add_argument("--password-file", help="file holding the broker password (`koala provision` writes the "
                   "monitor's as broker/secrets/koala-monitor.password)")
    p.add_argument("--ca-file", "--ca", dest="ca_file", help="CA certificate for mqtts:// (provisioned: broker/certs/ca.crt)")
    p.add_argument("--run-dir", metavar="DIR", help="watch the broker of the `koala demo` run in DIR (its run.json)")
    p.add_argument("--count", type=int, default=None, help="exit after N messages")
    p.add_argument("--timeout", type=float, default=None, help="exit after S seconds")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="exit 1 when the broker does not accept the connection within S seconds (default 10)")
    p.add_argument("--quiet-warn", type=float, default=10.0, metavar="S",
                   help="warn when no KOALA message arrives within S seconds: a wrong broker (default 10; 0: never)")


def run(args: argparse.Namespace) -> int:
    from server_app.commands import stop_on_signals
    from server_app.monitor import Monitor, format_line, subscriptions, to_json

    try:
        filters = subscriptions(args.topics)
    except ValueError as exc:
        print(f"koala monitor: {exc}", file=sys.stderr)
        return 2
    if args.broker:
        broker = args.broker
    elif args.run_dir:
        from server_app.demo.run_file import read_run_file, require_live

        broker = require_live(read_run_file(args.run_dir))["broker_url"]
    else:
        broker = _default_broker()

    def emit(rec: dict) -> None:
        print(to_json(rec) if args.json else format_line(rec), flush=True)

    password = args.password if args.password is not None else os.environ.get("KOALA_MONITOR_PASSWORD")
    if args.password_file:
        try:
            password = open(args.password_file).read().strip()  # noqa: SIM115 - one read
        except OSError as exc:
            print(f"koala monitor: cannot read the password file {args.password_file}: {exc.strerror}", file=sys.stderr)
            return 2
    if args.ca_file and not os.path.isfile(args.ca_file):
        print(f"koala monitor: CA file {args.ca_file} not found (--ca-file)", file=sys.stderr)
        return 2
    try:
        mon = Monitor(broker, filters, emit, username=args.username, password=password, ca_file=args.ca_file, count=args.count)
    except ValueError as exc:
        print(f"koala monitor: {exc}", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        print(f"# {line}", file=sys.stderr, flush=True)

    def joined() -> None:
        say(f"joined {mon.url} as {mon.client_id}, watching " + " ".join(f for f, _ in filters))
        for f in mon.refused:
            say(f"the broker refused the subscription to {f} (its ACL; the provisioned read-only account is "
                "koala-monitor: --username koala-monitor --password-file broker/secrets/koala-monitor.password)")

    def quiet() -> None:
        say(f"no KOALA traffic seen on {mon.url} in {args.quiet_warn:g} s: is this the right broker? (a KOALA server "
            "keeps a retained koala/v1/server/status there; a demo's broker is in demo_runs/<id>/run.json: --run-dir DIR)")

    stop_on_signals("koala monitor")
    try:
        mon.run(args.timeout, connect_timeout_s=args.connect_timeout, on_joined=joined,
                quiet_s=args.quiet_warn or None, on_quiet=quiet)  # fmt: skip
    except KeyboardInterrupt:
        return 0
    except ConnectionError as exc:
        print(f"koala monitor: {exc}", file=sys.stderr)
        return 1
    return 0

