"""Fixtures of the reliability tests: private brokers, digits-sized server files, server processes.

Everything starts *real* components on loopback: a private Mosquitto per test (so a test may kill
or restart it), the real `ServerServices` in this process or as its own OS process. Data are
sklearn digits (8x8x1) and the large model is narrow, so a round costs well under a second of server
compute on a shared 2-core machine. Helpers live in rel_helpers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rel_helpers import Db, ServerProcess


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A private Mosquitto (persistence on, so retained state survives restart()) on a free port."""
    from server_app.transport.broker import MosquittoBroker, find_mosquitto_binary

    if find_mosquitto_binary() is None:
        pytest.skip("mosquitto binary not installed")
    b = MosquittoBroker(workdir=tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """proxy.npz (x) and test.npz (x, y) from sklearn digits: what the server loads."""
    from server_app.data.datasets import load_dataset

    d = tmp_path_factory.mktemp("digits")
    ds = load_dataset("digits", seed=0)
    np.savez(d / "proxy.npz", x=ds.x_train[:200])
    np.savez(d / "test.npz", x=ds.x_test[:200], y=ds.y_test[:200])
    return {"proxy_path": str(d / "proxy.npz"), "test_path": str(d / "test.npz")}


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[[Any], ServerProcess]]:
    made: list[ServerProcess] = []

    def make(options: Any) -> ServerProcess:
        sp = ServerProcess(options, tmp_path)
        made.append(sp)
        return sp

    yield make
    for sp in made:
        sp.stop()


@pytest.fixture
def inproc_server() -> Iterator[Callable[[Any], Any]]:
    """The real ServerServices in this process (for tests that inspect the large model)."""
    made: list[Any] = []

    def make(options: Any) -> Any:
        from server_app.services import ServerServices

        s = ServerServices(options)
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        s.stop()


# ---- registry reads (what was committed, read with a fresh engine) ---------------------------------


@pytest.fixture
def db_reader() -> Iterator[Callable[[str], Db]]:
    made: list[Db] = []

    def make(url: str) -> Db:
        d = Db(url)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
