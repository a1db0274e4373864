"""`koala db upgrade|current`: apply or show the registry's Alembic migrations."""

from __future__ import annotations

import argparse

HELP = "migrate the registry database (upgrade) or show its revision (current)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["upgrade", "current"])
    p.add_argument("--database-url", "--db", dest="database_url",
                   help="SQLAlchemy URL (default: KOALA_DATABASE__URL / config file / sqlite:///./koala.db)")
    p.add_argument("--config", help="KOALA config file (TOML/YAML/JSON)")


def _url(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    from server_app.config import load_settings

    return load_settings(args.config).database.url


def run(args: argparse.Namespace) -> int:
    from server_app.registry import RegistryUnavailable, current_revision, head_revision, upgrade_to_head

    url = _url(args)
    try:
        if args.action == "upgrade":
            rev = upgrade_to_head(url)
            print(f"database at revision {rev}")
            return 0
        rev = current_revision(url)
    except RegistryUnavailable as exc:
        from device_firmware_py.cli import CommandError

        raise CommandError(f"{exc}\n  check --database-url (or database.url / KOALA_DATABASE__URL) and that the "
                           "database server is up") from None  # fmt: skip
    head = head_revision()
    print(f"{rev or 'none (empty database)'}{' (head)' if rev == head else f' (head is {head})'}")
    return 0
