"""Throw-away PostgreSQL databases for the test suite and the benchmarks.

Why here and not in tests/: the benchmarks (bench/) and the tests need the same thing — a brand-new
empty database on a real server, dropped afterwards, as a SQLAlchemy URL — and both import the
server package. One implementation keeps the create/drop (and the URL form) from drifting apart.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager


class ScratchUnavailable(RuntimeError):
    """The PostgreSQL server at the admin URL could not be reached (nothing was created)."""


@contextmanager
def scratch_postgres(admin_url: str, prefix: str = "koala_scratch") -> Iterator[str]:
    """Create `<prefix>_<random>` on the server of `admin_url` (a libpq URL with rights to create
    databases), yield its SQLAlchemy URL (psycopg 3 driver), drop it (FORCE) on exit. Raises
    ScratchUnavailable before creating anything when the server is not reachable."""
    try:
        import psycopg
        from psycopg import sql

        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except Exception as exc:
        raise ScratchUnavailable(f"PostgreSQL not reachable at {admin_url}: {exc.__class__.__name__}") from exc
    name = f"{prefix}_{secrets.token_hex(5)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
