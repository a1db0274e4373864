"""The REST client shared by the operator commands (`koala rounds`, `koala devices`).

Why over REST and not the database: an operator's laptop reaches the server's API, not its
database, and the API is where authorization and validation live. The token comes from
`--token-file`, else `KOALA_API_TOKEN`, else `KOALA_API__BEARER_TOKEN` (the server's own setting);
the URL from `--api`, else `--run-dir DIR` (a demo's run.json: its API URL and token file), else
`KOALA_API_URL`, else the newest live demo under ./demo_runs (said on stderr), else
http://127.0.0.1:8000. Every failure is one line (CommandError), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_API = "http://127.0.0.1:8000"


def add_api_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", help=f"server API base URL (default: KOALA_API_URL or {DEFAULT_API})")
    p.add_argument("--token-file", help="file holding the API bearer token (default: KOALA_API_TOKEN, "
                   "KOALA_API__BEARER_TOKEN; a demo writes <run dir>/api_token)")
    p.add_argument("--run-dir", metavar="DIR", help="a `koala demo` run dir: its API URL and token from DIR/run.json "
                   "(default, when no --api / KOALA_API_URL: the newest live demo under ./demo_runs)")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")


def api_base(args: argparse.Namespace) -> str:
    """The API URL (see the module docstring for the order); fills args.token_file from a demo's run.json."""
    from server_app.demo.run_file import live_run, read_run_file, require_live

    if getattr(args, "_api_base", None):
        return args._api_base
    run = None
    if args.api:
        base = args.api
    elif getattr(args, "run_dir", None):
        run = require_live(read_run_file(args.run_dir))
    elif not os.environ.get("KOALA_API_URL") and (run := live_run()) is not None:
        import sys

        print(f"(using the demo running in {run['run_dir']}: {run.get('api_url')}; --api URL for another server)",
              file=sys.stderr)  # fmt: skip
    if run is not None:
        base = run["api_url"]
        if not args.token_file and run.get("token_file"):
            args.token_file = run["token_file"]
    elif not args.api:
        base = os.environ.get("KOALA_API_URL") or DEFAULT_API
    args._api_base = base.rstrip("/")
    return args._api_base


def _token(args: argparse.Namespace) -> str | None:
    from device_firmware_py.cli import CommandError

    api_base(args)  # a demo's run.json names its token file
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip() or None
        except OSError as exc:
            raise CommandError(f"cannot read the token file {args.token_file}: {exc.strerror}") from None
    return os.environ.get("KOALA_API_TOKEN") or os.environ.get("KOALA_API__BEARER_TOKEN") or None


def request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One API call; the decoded JSON, or CommandError with the server's reason."""
    import httpx

    from device_firmware_py.cli import CommandError

    base = api_base(args)
    token = _token(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(method, f"{base}/api/v1{path}", json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach the KOALA API at {base}: {exc}\n  start `koala serve`, or pass --api URL (a demo's: --run-dir DIR)") from None
    if r.status_code in (401, 403):
        raise CommandError(f"{method} {path}: {r.status_code}, the API wants a bearer token "
                           "(--token-file, KOALA_API_TOKEN or KOALA_API__BEARER_TOKEN)")  # fmt: skip
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail") or r.json().get("title")
        except ValueError:
            detail = r.text[:200]
        raise CommandError(f"{method} {path}: {r.status_code} {detail}")
    return r.json() if r.content else None


def emit(args: argparse.Namespace, data: Any, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """--json: the API's document; else a plain table of `columns`."""
    if args.json:
        print(json.dumps(data, indent=1, default=str))
        return
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)).rstrip())


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return str(len(v))
    return str(v)
