"""Fixtures of the reliability tests: private brokers, digits-sized server files, server processes.

Everything here starts *real* components on loopback: a private Mosquitto per test (so a test may
kill or restart it), the real `ServerServices` either in this process or as its own OS process
(`rel_server.py`, so it can be SIGKILLed), and registry queries that read what was committed.
Data are sklearn digits (8x8x1) and the large model is narrow, so a round costs well under a second
of server compute on a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SMALL_LARGE = {"width": 8, "fc": 32}  # LargeCNN kwargs: a few thousand parameters on 8x8 inputs


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str = "condition", step: float = 0.1) -> Any:
    """Poll until cond() is truthy; fail the test with `what` on timeout (behaviour, not timing)."""
    t_end = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(step)


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


def server_options(db_url: str, data_dir: Path, files: dict[str, str], port: int, **kw: Any) -> Any:
    """ServerOptions for a logits-only KOALA server on digits (simulated devices can answer it)."""
    from server_app.services import ServerOptions

    base: dict[str, Any] = dict(
        db_url=db_url, data_dir=str(data_dir), broker_port=port, shared_subscriptions=True,
        strategy="koala_homo", strategy_options={"variant": "logits"}, large=dict(SMALL_LARGE), rounds=3,
        round_timeout_s=30.0, min_devices=1, wait_devices_s=30.0, quorum_fraction=0.5, eval_samples=100,
        torch_threads=1, **files,
    )  # fmt: skip
    base.update(kw)
    return ServerOptions(**base)


class ServerProcess:
    """`rel_server.py` as a child process: start() waits for READY; kill() is SIGKILL."""

    def __init__(self, options: Any, workdir: Path):
        self.options = options
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server{self.starts}.log"

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        self.starts += 1
        opts = self.workdir / "server_options.json"
        opts.write_text(json.dumps(asdict(self.options)))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, str(HERE / "rel_server.py"), str(opts)], stdout=subprocess.PIPE,
                                     stderr=log, env=env, cwd=REPO)  # fmt: skip
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until READY or the child dies
        if b"READY" not in line:
            self.proc.wait(10)
            raise AssertionError(f"server did not start:\n{self.log_path.read_text()[-3000:]}")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return "".join((self.workdir / f"server{i}.log").read_text() for i in range(1, self.starts + 1))


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
class Db:
    """Read-only views over a registry URL (a new Registry each time: never the server's session)."""

    def __init__(self, url: str):
        from server_app.registry import Registry

        self.reg = Registry(url)

    def rounds(self) -> dict[int, Any]:
        from server_app.registry import crud

        return {r.id: r for r in self.reg.run(crud.list_rounds, limit=crud.MAX_PAGE)}

    def assignments(self, round_id: int | None = None) -> list[Any]:
        from server_app.registry import crud

        return list(self.reg.run(crud.list_assignments, round_id=round_id, limit=crud.MAX_PAGE))

    def rejections(self) -> list[dict[str, Any]]:
        from sqlalchemy import select

        from server_app.registry.models import Event

        def fn(s: Any) -> list[dict[str, Any]]:
            rows = s.scalars(select(Event).where(Event.kind == "rejected").order_by(Event.id))
            return [{"device_id": e.device_id, "round_id": e.round_id, **(e.detail or {})} for e in rows]

        return self.reg.run(fn)

    def models(self) -> list[Any]:
        from sqlalchemy import select

        from server_app.registry.models import ModelVersion

        return list(self.reg.run(lambda s: list(s.scalars(select(ModelVersion).order_by(ModelVersion.version)))))

    def close(self) -> None:
        self.reg.dispose()


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
