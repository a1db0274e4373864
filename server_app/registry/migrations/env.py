"""Alembic environment: runs against the URL in the config (or KOALA_DATABASE_URL), with our engine."""

from __future__ import annotations

import os

from alembic import context

from server_app.registry.models import Base
from server_app.registry.session import make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    """Programmatic callers pass attributes['koala_url']; the alembic CLI may use KOALA_DATABASE_URL."""
    return (
        config.attributes.get("koala_url")
        or os.environ.get("KOALA_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
        or "sqlite:///./koala.db"
    )


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
