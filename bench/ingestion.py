"""Ingestion: result submissions/s accepted, validated and persisted by the server vs the raw broker.

Same Mosquitto, same publisher process, same payloads, same (shared) subscription filter:
  raw       a paho subscriber that only counts what the broker delivers (no server);
  sqlite    the server's path: MqttClient (manual ack) -> ingest_worker (batches of up to 256) ->
            Ingestor.ingest_batch (contract decode, digest, round / participant / shape checks, one
            registry read) -> RegistryStore.commit (one fsync'd segment, one transaction) ->
            Collection -> PUBACKs, on a SQLite registry;
  postgres  the same on a fresh PostgreSQL database at 127.0.0.1:5432.
The raw baseline runs before and after the server paths; its mean is the denominator, and the
spread between the two raw runs says how much the machine's load moved during the benchmark.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.common import pg_database, python_child, ratio, table, write_result
from device_firmware_py.contract import topics

NAME = "ingestion"


class Publisher:
    """`bench.swarm publish` child: pre-encodes M frames, publishes on "go", reports PUBACKs."""

    def __init__(self, port: int, m: int, proxy: int, classes: int, dtype: str):
        self.proc = python_child("bench.swarm", "publish", "--port", str(port), "--m", str(m), "--proxy", str(proxy),
                                 "--classes", str(classes), "--dtype", dtype, stdin=-1, stdout=-1)  # fmt: skip
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"publisher exited rc={self.proc.wait()}")
        return json.loads(line)

    def go(self) -> float:
        assert self.proc.stdin is not None
        t0 = time.perf_counter()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return t0

    def finish(self) -> dict[str, Any]:
        rep = self._read()
        assert self.proc.stdin is not None
        self.proc.stdin.write("bye\n")
        self.proc.stdin.flush()
        self.proc.wait(30)
        return rep


def _wait(cond: Any, timeout_s: float) -> bool:
    t_end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > t_end:
            return False
        time.sleep(0.005)
    return True


def _wait_count(count: Any, target: int, timeout_s: float, stall_s: float = 15.0) -> bool:
    """Wait for `count() >= target`; give up after `stall_s` without progress. A stall is a finding:
    QoS 1 only covers the publisher->broker hop; a subscriber that falls behind by more than the
    broker's max_queued_messages loses the overflow."""
    t_end = time.monotonic() + timeout_s
    last, t_last = -1, time.monotonic()
    while count() < target:
        now = time.monotonic()
        if count() != last:
            last, t_last = count(), now
        if now > t_end or now - t_last > stall_s:
            return False
        time.sleep(0.005)
    return True


def run_raw(port: int, m: int, proxy: int, classes: int, dtype: str, timeout_s: float) -> dict[str, Any]:
    """Baseline: the broker alone moving the same frames to one subscriber (same filter, QoS 1)."""
    times: list[float] = []
    nbytes = [0]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw-sub", clean_session=True)
    subscribed = threading.Event()
    c.on_connect = lambda cl, *_: cl.subscribe(topics.shared("koala-server", topics.filter_results()), 1)
    c.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        nbytes[0] += len(msg.payload)
        times.append(time.perf_counter())

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        subscribed.wait(10)
        pub = Publisher(port, m, proxy, classes, dtype)
        t0 = pub.go()
        ok = _wait_count(lambda: len(times), m, timeout_s)
        rep = pub.finish()
    finally:
        c.disconnect()
        c.loop_stop()
    return _summary("raw broker", m, t0, times, ok, rep, pub.ready["payload_bytes"])


def _round(server: Any, label: str, port: int, m: int, proxy: int, classes: int, dtype: str, timeout_s: float,
           accepted: Any, times: list[float], settle_s: float) -> dict[str, Any]:
    """One collecting round of M devices on `server` (MqttFleet.run_round in a thread: it opens the
    Collection and waits) while the publisher sends M results; `accepted()` counts the accepted
    ones so far and `times` holds when each was accepted. settle_s: after the assignment frames
    went out, before the results do."""
    from bench.swarm import device_id

    devices = [device_id(i) for i in range(m)]
    box: dict[str, Any] = {}

    def collect() -> None:
        try:
            box["round"] = server.run_round(1, devices, None, timeout_s=timeout_s)
        except Exception as exc:
            box["error"] = repr(exc)

    th = threading.Thread(target=collect, daemon=True)
    th.start()
    _wait(lambda: server.fleet.collection is not None and server.fleet.collection.sent_at, 60)
    time.sleep(settle_s)
    pub = Publisher(port, m, proxy, classes, dtype)
    t0 = pub.go()
    ok = _wait_count(accepted, m, timeout_s)
    rep = pub.finish()
    if not ok:
        server.fleet.abort()  # stop waiting for results the broker dropped
    th.join(30)
    out = _summary(label, m, t0, list(times), ok, rep, pub.ready["payload_bytes"])
    out["round_error"] = box.get("error")
    out["round_accepted"] = (box.get("round") or {}).get("accepted")
    out["persisted"] = server.registry.run(_count_accepted)
    return out


def run_server(db_url: str, label: str, port: int, m: int, proxy: int, classes: int, dtype: str,
               timeout_s: float) -> dict[str, Any]:
    """The server's ingestion path into the registry at db_url, for one collecting round of M devices."""
    from bench.server_side import ServerSide

    with tempfile.TemporaryDirectory(prefix="koala-bench-ingest-") as tmp:
        server = ServerSide(db_url, tmp, "127.0.0.1", port, proxy_shape=(proxy, classes)).start()
        try:
            out = _round(server, label, port, m, proxy, classes, dtype, timeout_s, lambda: len(server.accept_times),
                         server.accept_times, settle_s=0.3)  # fmt: skip
            out["ingestor_counts"] = dict(server.ingestor.counts)
            return out
        finally:
            server.stop()


def run_workers(db_url: str, k: int, port: int, m: int, proxy: int, classes: int, dtype: str,
                timeout_s: float) -> dict[str, Any]:
    """K ingestion worker processes (`ServerServices` role ingest, bench.ingest_worker_proc) on the
    shared subscription; this process runs the round (MqttFleet, no results subscription of its
    own) as the orchestrator does. Accepted = committed rows in the registry, polled every 10 ms."""
    from bench.server_side import ServerSide

    with tempfile.TemporaryDirectory(prefix="koala-bench-workers-") as tmp:
        server = ServerSide(db_url, tmp, "127.0.0.1", port, proxy_shape=(proxy, classes), ingest=False,
                            client_id=f"bench-orch-{k}").start()  # fmt: skip
        procs = [python_child("bench.ingest_worker_proc", db_url, tmp, str(port), stdin=-1, stdout=-1) for _ in range(k)]
        times: list[float] = []

        def accepted() -> int:
            n = server.registry.run(_count_accepted)
            times.extend([time.perf_counter()] * (n - len(times)))
            return n

        try:
            for p in procs:
                assert p.stdout is not None
                if "READY" not in p.stdout.readline():
                    raise RuntimeError(f"ingestion worker exited rc={p.wait()}")
            out = _round(server, f"{k} ingest worker{'s' if k > 1 else ''}", port, m, proxy, classes, dtype, timeout_s,
                         accepted, times, settle_s=1.0)  # every worker's view holds the open round  # fmt: skip
            out["workers"] = k
            out["ingestor_counts"] = _stop_workers(procs)  # summed over the workers
            return out
        finally:
            _stop_workers(procs)
            server.stop()


def _stop_workers(procs: list[Any]) -> dict[str, int]:
    """Say `bye` to each worker process; sum the outcome counts each prints on its way out."""
    total: dict[str, int] = {}
    for p in procs:
        if p.poll() is not None:
            continue
        with contextlib.suppress(OSError, ValueError):
            p.stdin.write("bye\n")
            p.stdin.flush()
        try:
            line = p.stdout.readline() if p.stdout is not None else ""
            for key, n in (json.loads(line) if line.startswith("{") else {}).items():
                total[key] = total.get(key, 0) + int(n)
            p.wait(30)
        except Exception:
            p.kill()
            p.wait()
    return total


def stage_breakdown(db_url: str, port: int, m: int, proxy: int, classes: int, dtype: str) -> dict[str, Any]:
    """Where the server's time per message goes, without MQTT: Ingestor.ingest_batch called directly
    in batches of MAX_BATCH, next to its two big parts timed alone on the same frames (contract
    decode + checks, and the fsync'd segment write RegistryStore.commit does). DB time = the rest."""
    from bench.server_side import ServerSide
    from bench.swarm import canned_logits, device_id, result_frame
    from device_firmware_py.contract import Assignment, TrainingPlan, codec
    from server_app.ingest_worker import MAX_BATCH
    from server_app.rounds.collection import Collection, Expectation
    from server_app.submission_log import write_segment

    lg = canned_logits(proxy, classes, 0)
    devices = [device_id(i) for i in range(m)]
    frames = [(topics.device_result(d), result_frame(d, 1, lg, dtype=dtype)) for d in devices]
    asg = Assignment(round_id=1, device_id=devices[0], arch="cnn_small", plan=TrainingPlan(upload=("logits",)))
    expect = Expectation.from_assignment(asg, num_classes=classes, proxy_size=proxy, proxy_digest=None)
    col = Collection(round_id=1, expect=dict.fromkeys(devices, expect), deadline=time.time() + 3600)
    t0 = time.perf_counter()
    for t, p in frames:
        _, msg = codec.decode_for_topic(t, p)
        codec.frame_digest(p)
        col.check(msg)  # the accept decision the ingestor makes
    decode_s = (time.perf_counter() - t0) / m
    with tempfile.TemporaryDirectory(prefix="koala-bench-stage-") as tmp:
        t0 = time.perf_counter()
        for i in range(0, m, MAX_BATCH):
            write_segment(Path(tmp) / "blobs", 1, [p for _, p in frames[i : i + MAX_BATCH]])
        write_s = (time.perf_counter() - t0) / m
        server = ServerSide(db_url, tmp, "127.0.0.1", port, proxy_shape=(proxy, classes), client_id="bench-stage").start()
        th = threading.Thread(target=lambda: server.run_round(1, devices, None, timeout_s=120), daemon=True)
        th.start()
        try:
            _wait(lambda: server.fleet.collection is not None and server.fleet.collection.sent_at, 60)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(0, m, MAX_BATCH):
                server.ingestor.ingest_batch(frames[i : i + MAX_BATCH])
            total_s = (time.perf_counter() - t0) / m
            cpu_s = (time.process_time() - c0) / m  # the whole process: fsync waits are not CPU
            th.join(30)
        finally:
            server.stop()
    return {"messages": m, "direct_msgs_per_s": 1 / total_s, "ms_per_msg_total": total_s * 1e3,
            "cpu_ms_per_msg": cpu_s * 1e3, "payload_bytes": len(frames[0][1]),
            "ms_decode_validate": decode_s * 1e3, "ms_segment_write_fsync": write_s * 1e3,
            "ms_registry_rest": max(0.0, total_s - decode_s - write_s) * 1e3}  # fmt: skip


def _count_accepted(s: Any) -> int:
    from sqlalchemy import func, select

    from server_app.registry.models import Assignment

    return int(s.scalar(select(func.count()).select_from(Assignment).where(Assignment.status == "accepted")) or 0)


def _summary(label: str, m: int, t0: float, times: list[float], ok: bool, rep: dict[str, Any],
             payload: int) -> dict[str, Any]:
    n = len(times)
    dt = (max(times) - t0) if times else None
    return {
        "path": label, "messages": m, "received": n, "complete": ok, "payload_bytes": payload,
        "wall_s": dt, "msgs_per_s": (n / dt) if dt else None, "mb_per_s": (n * payload / dt / 1e6) if dt else None,
        "publisher_t_s": rep.get("t_publish_s"),
    }  # fmt: skip


def run(quick: bool = False, out: Path | None = None, workers: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
    from bench.common import DEFAULT_OUT
    from server_app.transport.broker import MosquittoBroker

    started, load0 = time.time(), __import__("os").getloadavg()
    out = out or DEFAULT_OUT
    cases = [{"proxy": 5000, "classes": 10, "dtype": "float16", "m": 60 if quick else 1000}]
    if not quick:
        cases.append({"proxy": 100, "classes": 10, "dtype": "float16", "m": 1500})
    timeout_s = 120.0 if quick else 300.0
    raw_rows: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    ratios: dict[str, Any] = {}
    notes: list[str] = []
    stages: list[dict[str, Any]] = []
    broker = MosquittoBroker(persistence=False).start()
    try:
        for case in cases:
            key = f"{case['proxy']}x{case['classes']}_{case['dtype']}"
            args = (broker.port, case["m"], case["proxy"], case["classes"], case["dtype"], timeout_s)
            res = [run_raw(*args)]
            res.append(run_server(f"sqlite:///{tempfile.mkdtemp(prefix='koala-bench-db-')}/koala.db", "server sqlite", *args))
            with pg_database() as pg:
                if pg is None:
                    notes.append("PostgreSQL not reachable: postgres path skipped")
                else:
                    res.append(run_server(pg, "server postgres", *args))
            for k in workers:  # the split server: K `role ingest` processes on one PostgreSQL registry
                with pg_database() as pg:
                    if pg is not None:
                        res.append(run_workers(pg, k, *args))
            res.append(run_raw(*args))
            stage = stage_breakdown(f"sqlite:///{tempfile.mkdtemp(prefix='koala-bench-db-')}/koala.db", broker.port,
                                    min(case["m"], 200), case["proxy"], case["classes"], case["dtype"])
            stage["case"] = key
            stages.append(stage)
            raws = [r for r in res if r["path"] == "raw broker"]
            base = sum(r["msgs_per_s"] or 0 for r in raws) / len(raws)
            for r in res:
                r["case"] = key
                r["ratio_vs_raw"] = ratio(r["msgs_per_s"], base)
                rows.append([key, r["path"], r["payload_bytes"], r["messages"], r["received"], r["msgs_per_s"],
                             r["mb_per_s"], r["ratio_vs_raw"]])  # fmt: skip
                if r["path"] != "raw broker":
                    ratios[f"{key}/{r['path'].replace(' ', '_')}"] = r["ratio_vs_raw"]
            ratios[f"{key}/raw_spread"] = ratio(min(r["msgs_per_s"] or 0 for r in raws), max(r["msgs_per_s"] or 1 for r in raws))
            raw_rows += res
    finally:
        broker.cleanup()
    print(table(["case", "path", "payload B", "sent", "accepted", "msg/s", "MB/s", "ratio vs raw"], rows))
    print()
    print(table(["case", "direct msg/s (no MQTT, sqlite)", "ms/msg", "decode+validate ms", "segment write+fsync ms",
                 "registry ms"], [[x["case"], x["direct_msgs_per_s"], x["ms_per_msg_total"], x["ms_decode_validate"],
                                   x["ms_segment_write_fsync"], x["ms_registry_rest"]] for x in stages]))  # fmt: skip
    return write_result(NAME, out, quick=quick, params={"cases": cases, "qos": 1, "broker": "mosquitto 2.0.11 private",
                        "subscription": "$share/koala-server/koala/v1/devices/+/up/result", "publisher_inflight": 20},
                        raw={"runs": raw_rows, "stages": stages}, ratios=ratios, notes=notes, started=started, load_start=load0)  # fmt: skip


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
