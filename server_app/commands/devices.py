"""`koala devices ls|show|revoke|readmit`: the fleet as the server's registry knows it (REST)."""

from __future__ import annotations

import argparse

from server_app.commands.admin_client import add_api_options, emit, request

HELP = "list and inspect devices, revoke or re-admit one, through the server's REST API"
COLUMNS = ["id", "arch", "status", "online", "num_samples", "last_seen", "revoked"]


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("ls", help="devices (revoked ones with --all)")
    ls.add_argument("--online", action="store_true", help="only devices online now")
    ls.add_argument("--all", action="store_true", help="include revoked devices")
    ls.add_argument("--limit", type=int, default=100)
    parsers = [ls]
    for name, text in (("show", "one device with its submissions"),
                       ("revoke", "revoke: out of every later round, results refused, broker account deleted "
                                  "when the server manages the broker"),
                       ("readmit", "clear the revoked flag (issue new credentials with `koala provision rotate`)")):  # fmt: skip
        sp = sub.add_parser(name, help=text)
        sp.add_argument("device_id")
        parsers.append(sp)
    for sp in parsers:
        add_api_options(sp)


def run(args: argparse.Namespace) -> int:
    if args.action == "ls":
        q = f"?limit={args.limit}" + ("&status=online" if args.online else "") + ("&include_revoked=true" if args.all else "")
        page = request(args, "GET", f"/devices{q}")
        emit(args, page, COLUMNS, page["items"])
    elif args.action == "show":
        d = request(args, "GET", f"/devices/{args.device_id}")
        emit(args, d, COLUMNS, [d])
    else:
        d = request(args, "POST", f"/devices/{args.device_id}/revoke", {"revoked": args.action == "revoke"})
        print(d if args.json else f"{d['id']}: {'revoked' if d['revoked'] else 're-admitted'}")
    return 0
