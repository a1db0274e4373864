"""Shared pytest fixtures. Each block is owned by one area; add new blocks, keep them labelled."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

# ==== databases (registry owner) ===================================================================
# `db_url` runs a test twice: on a SQLite file and on a fresh PostgreSQL database created for that
# test (koala_test_<random>, dropped afterwards) on the server at 127.0.0.1:5432. Nothing else on
# that server is touched. The PostgreSQL variant is skipped when the server is not reachable.
PG_ADMIN_URL = os.environ.get("KOALA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


_PG_OK: bool | None = None


def pg_available() -> bool:
    global _PG_OK
    if _PG_OK is None:
        _PG_OK = _pg_reachable()
    return _PG_OK


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """SQLAlchemy URL of a brand-new empty PostgreSQL database, dropped after the test."""
    if not pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    from server_app.registry.scratch import scratch_postgres

    with scratch_postgres(PG_ADMIN_URL, "koala_test") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty database URL: SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'koala.db'}"
    return request.getfixturevalue("pg_database_url")


@pytest.fixture
def registry(db_url: str):
    """A migrated `server_app.registry.Registry` on both backends."""
    from server_app.registry import Registry

    reg = Registry(db_url)
    reg.upgrade()
    yield reg
    reg.dispose()


# ==== MQTT brokers (transport owner) ===============================================================
# `mosquitto_broker`: a private Mosquitto on a free loopback port per test module.
# `amqtt_broker`: the pure-Python broker in a background thread, per test module.
# `system_mqtt`: (host, port) of the machine's Mosquitto at 127.0.0.1:1883, skipped when absent.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory):
    from server_app.transport.broker import MosquittoBroker, find_mosquitto_binary

    if find_mosquitto_binary() is None:
        pytest.skip("mosquitto binary not installed")
    b = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def amqtt_broker():
    from server_app.transport.broker import AmqttBroker

    b = AmqttBroker()
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def system_mqtt() -> tuple[str, int]:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=2).close()
    except OSError:
        pytest.skip("no MQTT broker at 127.0.0.1:1883")
    return ("127.0.0.1", 1883)
