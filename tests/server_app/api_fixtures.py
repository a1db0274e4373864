"""Shared helpers of the API/metrics tests: a seeded registry on SQLite and PostgreSQL, app builders.

Not a conftest (tests/conftest.py already shadows that name for other folders); imported explicitly.
The registry is real (Alembic-migrated SQLite file or a fresh PostgreSQL database); the rows are
written through `server_app.registry.crud`, the same functions the orchestrator and ingestion use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from server_app.registry import Registry, crud
from server_app.registry.scratch import ScratchUnavailable, scratch_postgres

TOKEN = "t0ken-" + "x" * 26
PG_ADMIN_URL = os.environ.get("KOALA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


class RegistryServices:
    """The part of ServerServices the REST API reads: a registry (no broker, no orchestrator)."""

    def __init__(self, registry: Registry, orchestrator: Any = None, settings: Any = None) -> None:
        self.registry = registry
        self.orchestrator = orchestrator
        self.settings = settings

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def readiness(self) -> dict[str, bool]:
        return {"database": self.registry.ping()}


def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards), or skip when the server is absent."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_postgres(PG_ADMIN_URL, "koala_api_test"))
        except ScratchUnavailable as exc:  # no server here: the SQLite half still runs
            pytest.skip(str(exc))
        yield url


def seed(reg: Registry, model_dir: Path) -> dict[str, Any]:
    """Three devices, a completed round 0 (one accepted, one rejected), a collecting round 1, a model."""
    now = dt.datetime.now(dt.timezone.utc)
    blob = b"large-model-weights-" + bytes(range(256)) * 40
    path = model_dir / "large-v1.pt"
    path.write_bytes(blob)
    with reg.session() as s:
        crud.upsert_device_status(s, "dev-a", status="online", arch="cnn_small", num_samples=300,
                                  label_histogram=[30, 30, 30, 30, 30, 30, 30, 30, 30, 30], seen_at=now)  # fmt: skip
        crud.upsert_device_status(s, "dev-b", status="offline", arch="mlp_tiny", num_samples=120, seen_at=now)
        crud.upsert_device_status(s, "dev-c", status="online", arch="cnn_small", num_samples=50, seen_at=now)
        r0 = crud.create_round(s, strategy="koala_homo", participants=["dev-a", "dev-b"], quorum=1, round_id=0)
        for d in ("dev-a", "dev-b"):
            crud.create_assignment(s, r0.id, d, bytes_down=4000)
        crud.transition_round(s, r0.id, "collecting")
        crud.record_submission(s, r0.id, "dev-a", digest="a" * 64, bytes_up=2500, metrics={"test_acc": 0.6})
        crud.decide_submission(s, r0.id, "dev-a", "accepted")
        crud.record_rejection(s, reason="bad_digest", device_id="dev-b", round_id=r0.id, bytes_up=700,
                              detail="sha256 of the body does not match the header")  # fmt: skip
        crud.transition_round(s, r0.id, "aggregating")
        crud.transition_round(s, r0.id, "completed", metrics={"large_test_acc": 0.71, "rkd_loss": 0.42, "accepted": 1})
        crud.record_metrics(s, {"large_test_acc": 0.71, "rkd_loss": 0.42}, round_id=r0.id)
        mv = crud.add_model_version(s, kind="large", arch="vgg_large", path=str(path),
                                    sha256=hashlib.sha256(blob).hexdigest(), nbytes=len(blob), round_id=r0.id,
                                    metrics={"large_test_acc": 0.71}, version=1)  # fmt: skip
        crud.add_model_version(s, kind="large", arch="vgg_large", path=str(model_dir / "gone.pt"),
                               sha256="0" * 64, nbytes=1, version=2)  # fmt: skip
        r1 = crud.create_round(s, strategy="koala_homo", participants=["dev-a", "dev-c"], round_id=1)
        for d in ("dev-a", "dev-c"):
            crud.create_assignment(s, r1.id, d, bytes_down=4000)
        crud.transition_round(s, r1.id, "collecting", deadline=now + dt.timedelta(minutes=5))
        crud.record_rejection(s, reason="spoofed_device", device_id="dev-c", round_id=r1.id, bytes_up=10)
        crud.record_event(s, "round_started", round_id=r1.id)
        return {"model_sha256": mv.sha256, "model_bytes": blob}


@contextmanager
def served_app(app: Any, token_dir: Path) -> Iterator[tuple[str, Path]]:
    """The app under a real uvicorn on a free loopback port (a thread), with TOKEN in a token file:
    what the API-client CLIs (`koala rounds|devices|models --api URL --token-file F`) talk to."""
    import threading
    import time

    import uvicorn

    from server_app.api.auth import AuthConfig
    from server_app.transport.broker import free_port

    app.state.auth = AuthConfig(token=TOKEN, open_reads_localhost=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    t_end = time.monotonic() + 20
    while not server.started and time.monotonic() < t_end:
        time.sleep(0.05)
    token_file = token_dir / "api_token"
    token_file.write_text(TOKEN + "\n")
    try:
        yield f"http://127.0.0.1:{port}", token_file
    finally:
        server.should_exit = True
        t.join(10)
