"""Engines, sessions and migrations for the registry.

Why a `Registry` object instead of a global engine: the FastAPI app, the orchestrator and tests each
inject their own (SQLite file, PostgreSQL URL); nothing module-level holds a connection.
SQLite gets WAL (readers do not block the writer), foreign keys and a busy timeout on every
connection; PostgreSQL uses psycopg 3 (`postgresql+psycopg://`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from .errors import RegistryUnavailable
from .retry import with_db_retry

T = TypeVar("T")
log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
ALEMBIC_INI = Path(__file__).with_name("alembic.ini")


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 here (psycopg2 is not a dependency)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy, not pysqlite, open transactions (see _sqlite_begin): pysqlite's own handling
    # turns a SAVEPOINT outside a transaction into one that RELEASE commits, breaking atomicity.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the per-backend settings above; creates the SQLite file's directory."""
    url = normalize_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)  # a restarted PostgreSQL must not poison the pool
    if u.get_backend_name() == "postgresql":
        kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return create_engine(url, **kwargs)


def is_unavailable(err: BaseException) -> bool:
    """Transient outage (connection refused/lost, database locked) vs a real error."""
    if isinstance(err, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)):
        return True
    return isinstance(err, exc.DBAPIError) and bool(err.connection_invalidated)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except exc.SQLAlchemyError as err:
        if is_unavailable(err):
            raise RegistryUnavailable(f"database unavailable: {str(getattr(err, 'orig', None) or err).strip().splitlines()[0]}") from err
        raise


class Registry:
    """One database: engine + session factory + transactional helpers."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commit on success, rollback on error; outages become RegistryUnavailable."""
        with translate_errors(), self._factory() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    def run(self, fn: Callable[..., T], *args: Any, retry: bool = True, **kwargs: Any) -> T:
        """Run crud fn(session, *args) in its own transaction, retried as a whole on outages."""

        def once() -> T:
            with self.session() as s:
                return fn(s, *args, **kwargs)

        return with_db_retry(once) if retry else once()

    def upgrade(self) -> str | None:
        """Migrate this database to head; returns the revision."""
        return upgrade_to_head(self.url)

    def ping(self) -> bool:
        """True when a trivial query succeeds (readiness probes)."""
        from sqlalchemy import text

        try:
            with translate_errors(), self.engine.connect() as c:
                c.execute(text("SELECT 1"))
            return True
        except RegistryUnavailable:
            return False

    def dispose(self) -> None:
        self.engine.dispose()


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    cfg.attributes["koala_url"] = normalize_url(url)
    return cfg


def upgrade_to_head(url: str) -> str | None:
    """Apply every Alembic migration (works from an installed wheel: paths are package-relative)."""
    from alembic import command

    with translate_errors():
        command.upgrade(_alembic_config(url), "head")
    return current_revision(url)


def current_revision(url: str) -> str | None:
    """The revision stamped in the database, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with translate_errors(), engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()
