"""The server's round machinery without the large model: what `ServerServices` wires, minus KD.

Why a harness and not `ServerServices`: services also build the torch strategy, proxy and test
files; the ingestion and fleet benchmarks measure everything *but* device compute and KD. The parts
are the server's own — Registry (migrated), RegistryStore, Presence, Ingestor, the server's MQTT
client (manual ack, a shared subscription for results), the batching ingest worker
(`server_app.ingest_worker.subscribe_results`, the same call services.py makes), MqttFleet — wired
exactly as `server_app/services.py` wires them. Nothing is reimplemented here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.contract import topics
from device_firmware_py.contract.plan import TrainingPlan
from device_firmware_py.mqtt import MqttClient
from device_firmware_py.task import Assignment

SHARE_GROUP = "koala-server"


class ServerSide:
    """Registry + ingestion + MqttFleet on one broker. `start()`, `run_round(...)`, `stop()`."""

    def __init__(self, db_url: str, data_dir: str | Path, host: str, port: int, *, proxy_shape: tuple[int, int],
                 shared: bool = True, client_id: str = "bench-server", ingest: bool = True):
        self.db_url, self.data_dir = db_url, Path(data_dir)
        self.host, self.port = host, port
        self.proxy_shape = proxy_shape
        self.shared = shared
        self.client_id = client_id
        self.ingest = ingest  # False: results are ingested by other processes (role ingest workers)
        self.accept_times: list[float] = []
        self._lock = threading.Lock()
        self.state_log: list[tuple[int, str]] = []

    def start(self) -> ServerSide:
        from server_app.ingest import Ingestor, Presence
        from server_app.ingest_worker import subscribe_results
        from server_app.registry import Registry
        from server_app.rounds.fleet import MqttFleet
        from server_app.rounds.store import RegistryStore

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(self.db_url)
        self.registry.upgrade()
        self.store = RegistryStore(self.registry, self.data_dir)
        self.presence = Presence()
        self.fleet: MqttFleet | None = None
        self.ingestor = Ingestor(self.store, self.presence, lambda: self.fleet.collection if self.fleet else None)
        self.link = MqttClient(self.client_id, self.host, self.port, clean_session=True, manual_ack=True)
        if not self.link.start(wait_s=15):
            raise RuntimeError(f"broker {self.host}:{self.port} not reachable")
        results = topics.shared(SHARE_GROUP, topics.filter_results()) if self.shared else topics.filter_results()
        self.link.subscribe(topics.filter_device_status(), 1, self.ingestor.on_status)
        self.worker = subscribe_results(self.link, results, self.ingestor, on_outcomes=self._on_outcomes) if self.ingest else None
        proxy, classes = self.proxy_shape
        self.fleet = MqttFleet(self.link.publish, self.presence.online, self.store, num_classes=classes,
                               proxy_size=proxy, proxy_digest=None, default_timeout_s=300.0,
                               on_state=self._on_state, spill_dir=self.data_dir / "spill")  # fmt: skip
        return self

    def _on_outcomes(self, outs: list[Any]) -> None:
        """After a batch is committed (and acknowledged): when each result was accepted."""
        now = time.perf_counter()
        with self._lock:
            self.accept_times += [now for o in outs if o.status == "accepted"]

    def _on_state(self, round_id: int, state: str, **info: Any) -> None:
        """What RoundOrchestrator._fleet_state does: write the transition to the registry."""
        import datetime as dt

        kw: dict[str, Any] = {}
        if "deadline" in info:
            kw["deadline"] = dt.datetime.fromtimestamp(info["deadline"], dt.timezone.utc)
        self.store.transition(round_id, state, **kw)
        self.state_log.append((round_id, state))

    def wait_online(self, n: int, timeout_s: float) -> bool:
        t_end = time.monotonic() + timeout_s
        while len(self.presence.online()) < n:
            if time.monotonic() > t_end:
                return False
            time.sleep(0.05)
        return True

    def open_round(self, round_id: int) -> None:
        self.store.ensure_round(round_id, "bench", {"bench": True}, 0)

    def assignments(self, round_id: int, device_ids: list[str], teacher: np.ndarray | None) -> list[Assignment]:
        return [Assignment(round_id=round_id, device_id=d, arch="cnn_small", plan=TrainingPlan(upload=("logits",)),
                           teacher_logits=teacher) for d in device_ids]  # fmt: skip

    def run_round(self, round_id: int, device_ids: list[str], teacher: np.ndarray | None,
                  timeout_s: float = 300.0, fuse: bool = False) -> dict[str, Any]:
        """Fan-out + collection + validation + persistence of one round, as MqttFleet runs it;
        `fuse`: then the agreement filter and entropy fusion over the results' logits (the steps of
        KOALA's aggregation that read every result; no reverse KD)."""
        assert self.fleet is not None
        self.open_round(round_id)
        t0 = time.perf_counter()
        results = self.fleet.run_round(self.assignments(round_id, device_ids, teacher), quorum=len(device_ids),
                                       timeout_s=timeout_s)  # fmt: skip
        wall = time.perf_counter() - t0
        out = {"round_id": round_id, "wall_s": wall, "accepted": len(results), **self.fleet.last_stats}
        if fuse:
            from server_app.engine.fusion import fuse_logits
            from server_app.engine.robust import agreement_filter

            t1 = time.perf_counter()
            logits = [r.proxy_logits for r in results if r.proxy_logits is not None]
            keep, _agree = agreement_filter(logits, 0.3)
            q = fuse_logits([z for z, k in zip(logits, keep, strict=True) if k], "entropy")
            out.update(t_fuse_s=time.perf_counter() - t1, fused_rows=int(q.shape[0]), kept=int(keep.sum()))
        return out

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.link.stop()
        self.registry.dispose()
