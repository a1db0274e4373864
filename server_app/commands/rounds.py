"""`koala rounds ls|show|current|wait|start|stop|schedule`: steer rounds of a running server (REST)."""

from __future__ import annotations

import argparse
import time

from server_app.commands.admin_client import add_api_options, emit, request

HELP = "list, inspect, start and stop rounds, or change the schedule, through the server's REST API"
COLUMNS = ["id", "state", "strategy", "participants", "model_version", "large_test_acc", "error"]


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("ls", help="recent rounds, newest first")
    ls.add_argument("--state", help="only rounds in this state (completed, failed, collecting, ...)")
    ls.add_argument("--limit", type=int, default=20)
    show = sub.add_parser("show", help="one round with its per-device submissions")
    show.add_argument("round_id", type=int)
    sub.add_parser("current", help="the round running now (or the last one)")
    wait = sub.add_parser("wait", help="wait until rounds reach a state (scripts, CI), then list them")
    wait.add_argument("--state", default="completed", help="the state to wait for (default completed)")
    wait.add_argument("--count", type=int, default=1, help="how many rounds in that state (default 1)")
    wait.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (exit 1)")
    start = sub.add_parser("start", help="run one more round now")
    start.add_argument("--reason", help="recorded with the request")
    stop = sub.add_parser("stop", help="abort the running round")
    stop.add_argument("--reason", help="recorded as the round's error")
    sched = sub.add_parser("schedule", help="show the schedule policy, or change it with the options")
    sched.add_argument("--auto", action=argparse.BooleanOptionalAction, default=None,
                       help="run rounds automatically (--no-auto pauses; `start` still runs one)")
    sched.add_argument("--rounds", type=int, help="how many rounds the automatic schedule runs")
    sched.add_argument("--min-devices", type=int, help="online devices needed before a round starts")
    sched.add_argument("--interval", type=float, dest="interval_s", help="seconds between rounds")
    for sp in (ls, show, sub.choices["current"], wait, start, stop, sched):
        add_api_options(sp)


def _row(r: dict) -> dict:
    return {**r, "large_test_acc": (r.get("metrics") or {}).get("large_test_acc")}


def run(args: argparse.Namespace) -> int:
    if args.action == "ls":
        q = f"?limit={args.limit}" + (f"&state={args.state}" if args.state else "")
        page = request(args, "GET", f"/rounds{q}")
        emit(args, page, COLUMNS, [_row(r) for r in page["items"]])
    elif args.action == "wait":
        return _wait(args)
    elif args.action in ("show", "current"):
        r = request(args, "GET", "/rounds/current" if args.action == "current" else f"/rounds/{args.round_id}")
        emit(args, r, COLUMNS, [_row(r)])
        if not args.json and r.get("submissions"):
            print()
            emit(args, r, ["device_id", "status", "reason", "bytes_up"], r["submissions"])
    elif args.action == "start":
        out = request(args, "POST", "/rounds/start", {"reason": args.reason} if args.reason else None)
        print(out if args.json else f"round {out.get('round_id', out)} requested")
    elif args.action == "stop":
        out = request(args, "POST", "/rounds/stop", {"reason": args.reason} if args.reason else None)
        print(out if args.json else f"round {out.get('round_id', out)} stopping")
    else:
        change = {k: getattr(args, k) for k in ("auto", "rounds", "min_devices", "interval_s") if getattr(args, k) is not None}
        pol = request(args, "PUT", "/rounds/schedule", change) if change else request(args, "GET", "/rounds/schedule")
        emit(args, pol, list(pol), [pol])
    return 0


def _wait(args: argparse.Namespace) -> int:
    """Poll until `--count` rounds are in `--state`. A server that is not up yet, or restarting,
    is waited for too (until the timeout): a script can start `koala serve` and wait right away."""
    from device_firmware_py.cli import CommandError

    deadline = time.monotonic() + args.timeout
    last_error = ""
    while True:
        try:
            page = request(args, "GET", f"/rounds?state={args.state}&limit={max(args.count, 1)}")
            if len(page["items"]) >= args.count:
                emit(args, page, COLUMNS, [_row(r) for r in page["items"]])
                return 0
            last_error = ""
        except CommandError as exc:
            if "bearer token" in str(exc):
                raise
            last_error = str(exc).splitlines()[0]
        if time.monotonic() > deadline:
            why = f" (last error: {last_error})" if last_error else ""
            raise CommandError(f"no {args.count} round(s) {args.state} within {args.timeout:.0f} s{why}")
        time.sleep(2.0)
