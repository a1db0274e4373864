"""Fleet scale: round overhead and server peak RSS with N connected simulated devices.

Per N (fresh private Mosquitto each time): one `bench.swarm devices` process holds N real MQTT
sessions (one selector loop, canned valid logits, no device compute). Then, against the same swarm:
  raw     baseline: a bare paho "server" publishes the same N assignment frames (teacher logits
          from the contract codec, body encoded once per round like the server since 2026-11-25)
          and waits for N result frames — no validation, no registry;
  server  the server's machinery (bench.server_side: registry, Ingestor, MqttFleet.run_round) runs
          the same rounds: assignment encode + registry rows + fan-out + collection + validation +
          persistence. No KD, no device compute: that is the round overhead. Then the parts of
          KOALA's aggregation whose memory grows with the fleet — the agreement filter and the
          fusion over every accepted result's logits (what `koala_hetero` runs before reverse KD) —
          on the round's results as the fleet returns them (spilled to disk, file-mapped), timed
          apart (`t_fuse_s`) and inside the peak RSS.
Each side runs in its own process so its peak RSS (VmHWM) is its own.

Roles: `python -m bench.fleet_scale raw|server --port P --n N ...` print one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

NAME = "fleet_scale"


def _teacher(p: int, c: int) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal((p, c)) * 2.0).astype(np.float32)


# ------------------------------------------------------------------------------------ roles
def role_raw(a: argparse.Namespace) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    from bench.common import peak_rss_mib
    from bench.swarm import device_id
    from device_firmware_py.contract import codec, topics
    from device_firmware_py.contract.plan import TrainingPlan
    from device_firmware_py.task import Assignment

    rss0 = peak_rss_mib()
    got: dict[int, int] = {}
    cond = threading.Condition()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw-server", clean_session=True)
    c.max_inflight_messages_set(64)
    ready = threading.Event()
    c.on_connect = lambda cl, *_: cl.subscribe(topics.filter_results(), 1)
    c.on_subscribe = lambda *_: ready.set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        # the round id sits in the frame header; reading it is the least a server must do
        _, header, _ = codec.read_frame_header(bytes(msg.payload))
        with cond:
            got[header["round_id"]] = got.get(header["round_id"], 0) + 1
            cond.notify_all()

    c.on_message = on_message
    c.connect("127.0.0.1", a.port)
    c.loop_start()
    ready.wait(10)
    teacher = _teacher(a.proxy, a.classes)
    devices = [device_id(i) for i in range(a.n)]
    rounds = []
    for r in range(1, a.rounds + 1):
        t0 = time.perf_counter()
        encoder = codec.FrameEncoder()  # the teacher body once per round, as the server does
        for d in devices:
            asg = Assignment(round_id=r, device_id=d, arch="cnn_small", plan=TrainingPlan(upload=("logits",)),
                             deadline=time.time() + 300, teacher_logits=teacher)  # fmt: skip
            c.publish(topics.device_assign(d), encoder.encode(asg), qos=1)
        with cond:
            ok = cond.wait_for(lambda r=r: got.get(r, 0) >= a.n, timeout=a.timeout)
        rounds.append({"round_id": r, "wall_s": time.perf_counter() - t0, "received": got.get(r, 0), "complete": ok})
    c.disconnect()
    c.loop_stop()
    return {"side": "raw", "n": a.n, "rounds": rounds, "rss_start_mib": rss0, "peak_rss_mib": peak_rss_mib()}


def role_server(a: argparse.Namespace) -> dict[str, Any]:
    from bench.common import peak_rss_mib
    from bench.server_side import ServerSide
    from bench.swarm import device_id

    rss0 = peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="koala-bench-fleet-") as tmp:
        db = a.db or f"sqlite:///{tmp}/koala.db"
        t0 = time.perf_counter()
        server = ServerSide(db, tmp, "127.0.0.1", a.port, proxy_shape=(a.proxy, a.classes)).start()
        online = server.wait_online(a.n, a.timeout)
        t_presence = time.perf_counter() - t0
        rss_ready = peak_rss_mib()
        teacher = _teacher(a.proxy, a.classes)
        devices = sorted(d.device_id for d in server.presence.online())[: a.n] or [device_id(i) for i in range(a.n)]
        rounds = []
        try:
            for r in range(1, a.rounds + 1):
                try:
                    rounds.append(server.run_round(r, devices, teacher, timeout_s=a.timeout, fuse=True))
                except Exception as exc:  # QuorumNotMet at the deadline: report, do not hide
                    rounds.append({"round_id": r, "error": repr(exc), **(server.fleet.last_stats if server.fleet else {})})
        finally:
            server.stop()
    return {"side": "server", "n": a.n, "online": online, "t_presence_s": t_presence, "rounds": rounds,
            "rss_start_mib": rss0, "rss_ready_mib": rss_ready, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


# ----------------------------------------------------------------------------- orchestration
def _child(role: str, port: int, n: int, rounds: int, proxy: int, classes: int, timeout: float) -> dict[str, Any]:
    from bench.common import python_child

    proc = python_child("bench.fleet_scale", role, "--port", str(port), "--n", str(n), "--rounds", str(rounds),
                        "--proxy", str(proxy), "--classes", str(classes), "--timeout", str(timeout), stdout=-1)  # fmt: skip
    out, _ = proc.communicate(timeout=timeout * (rounds + 2) + 60)
    lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"side": role, "n": n, "error": f"rc={proc.returncode}", "rounds": []}
    return json.loads(lines[-1])


def _swarm_ready(swarm: Any) -> dict[str, Any]:
    """Read the `bench.swarm devices` child's events until its "ready" line (its connect report)."""
    assert swarm.stdout is not None
    for line in swarm.stdout:
        ev = json.loads(line)
        if "ready" in ev:
            return ev
    return {}


def _swarm_command(swarm: Any, cmd: str, reply: bool = False) -> dict[str, Any] | None:
    """Send one stdin command to the swarm child; with reply, return its one-line JSON answer."""
    assert swarm.stdin is not None and swarm.stdout is not None
    swarm.stdin.write(cmd + "\n")
    swarm.stdin.flush()
    return json.loads(swarm.stdout.readline()) if reply else None


def measure(n: int, rounds: int, proxy: int, classes: int, timeout: float) -> dict[str, Any]:
    from bench.common import python_child
    from server_app.transport.broker import MosquittoBroker

    broker = MosquittoBroker(persistence=False).start()
    swarm = python_child("bench.swarm", "devices", "--port", str(broker.port), "--n", str(n), "--proxy", str(proxy),
                         "--classes", str(classes), stdin=-1, stdout=-1)  # fmt: skip
    try:
        ready = _swarm_ready(swarm)
        raw = _child("raw", broker.port, n, rounds, proxy, classes, timeout)
        server = _child("server", broker.port, n, rounds, proxy, classes, timeout)
        stats = _swarm_command(swarm, "stats", reply=True)
        broker_fds = len(os.listdir(f"/proc/{broker.pid}/fd")) if broker.pid else None
        from bench.common import peak_rss_mib

        broker_rss = peak_rss_mib(broker.pid) if broker.pid else None
        _swarm_command(swarm, "stop")
        swarm.wait(60)
    finally:
        if swarm.poll() is None:
            swarm.kill()
        broker.cleanup()
    return {"n": n, "swarm_ready": ready, "swarm_stats": stats, "raw": raw, "server": server,
            "broker_fds": broker_fds, "broker_peak_rss_mib": broker_rss}  # fmt: skip


def connect_probe(n: int, nofile: int | None = None, timeout: float = 20.0) -> dict[str, Any]:
    """How many devices get a session (CONNACK + SUBACK) on a private Mosquitto with default
    max_connections, optionally under a lower open-files limit (a typical default is 1024)."""
    from bench.common import peak_rss_mib, python_child
    from server_app.transport.broker import MosquittoBroker, find_mosquitto_binary

    wrapper_dir = tempfile.mkdtemp(prefix="koala-bench-ulimit-")
    binary = None
    if nofile is not None:  # mosquitto under `prlimit --nofile`: what a stock `ulimit -n 1024` host does
        binary = str(Path(wrapper_dir) / "mosquitto")
        Path(binary).write_text(f"#!/bin/sh\nexec prlimit --nofile={nofile}:{nofile} {find_mosquitto_binary()} \"$@\"\n")
        os.chmod(binary, 0o755)
    broker = MosquittoBroker(persistence=False, binary=binary).start()
    swarm = python_child("bench.swarm", "devices", "--port", str(broker.port), "--n", str(n), "--proxy", "10",
                         "--ready-timeout", str(timeout), stdin=-1, stdout=-1)  # fmt: skip
    try:
        ready = _swarm_ready(swarm)
        fds = len(os.listdir(f"/proc/{broker.pid}/fd")) if broker.running and broker.pid else None
        rss = peak_rss_mib(broker.pid) if broker.running and broker.pid else None
        alive = broker.running
        _swarm_command(swarm, "stop")
        swarm.wait(60)
        log_tail = broker.log_path.read_text()[-4000:] if broker.log_path.exists() else ""
    finally:
        if swarm.poll() is None:
            swarm.kill()
        broker.cleanup()
    limit_errors = sorted({ln.split(": ", 1)[-1][:120] for ln in log_tail.splitlines()
                           if "rror" in ln or "limit" in ln.lower() or "too many" in ln.lower()})[:3]  # fmt: skip
    return {"n": n, "nofile": nofile, "sessions": ready.get("ready"), "complete": ready.get("complete"),
            "connect_s": ready.get("connect_s"), "broker_alive": alive, "broker_fds": fds,
            "broker_peak_rss_mib": rss, "swarm_rss_mib": ready.get("rss_mib"), "broker_log_errors": limit_errors}  # fmt: skip


def _best(side: dict[str, Any]) -> float | None:
    walls = [r["wall_s"] for r in side.get("rounds", []) if "wall_s" in r and not r.get("error")]
    return min(walls) if walls else None


def run(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    from bench.common import DEFAULT_OUT, ratio, table, write_result

    started, load0 = time.time(), os.getloadavg()
    out = out or DEFAULT_OUT
    ns = [5, 15] if quick else [100, 1000, 3000, 10000]  # issue 18: 1,000, 3,000 and 10,000 in one round
    proxy, classes = (500, 10) if quick else (5000, 10)
    rounds = 1 if quick else 2
    timeout = 60.0 if quick else 240.0
    results = [measure(n, rounds, proxy, classes, timeout) for n in ns]
    rows, ratios = [], {}
    base_n, base_srv = ns[0], _best(results[0]["server"])
    for res in results:
        n, srv, raw = res["n"], _best(res["server"]), _best(res["raw"])
        res["overhead_s"] = srv
        res["raw_round_s"] = raw
        res["server_vs_raw"] = ratio(srv, raw)
        # growth: (overhead(N)/overhead(N0)) / (N/N0); <= 1 means no worse than linear
        res["growth_vs_linear"] = ratio(ratio(srv, base_srv), n / base_n)
        ratios[f"n{n}/server_over_raw"] = res["server_vs_raw"]
        ratios[f"n{n}/growth_vs_linear"] = res["growth_vs_linear"]
        last = (res["server"].get("rounds") or [{}])[-1]
        rows.append([n, res["swarm_ready"].get("ready"), raw, srv, res["server_vs_raw"], res["growth_vs_linear"],
                     last.get("t_encode_s"), last.get("t_fuse_s"), res["server"].get("peak_rss_mib"), res["server"].get("rss_ready_mib"),
                     res["server"].get("t_presence_s"), res["broker_fds"]])  # fmt: skip
    # per device: what the server's peak RSS grows by from the smallest to the largest fleet measured
    big = [r for r in results if r["server"].get("peak_rss_mib") and r["n"] >= (1000 if not quick else 0)]
    slope = None
    if len(big) >= 2:
        lo, hi = big[0], big[-1]
        slope = (hi["server"]["peak_rss_mib"] - lo["server"]["peak_rss_mib"]) / (hi["n"] - lo["n"])
    ratios["rss_mib_per_device"] = slope
    summary = [{"devices": r["n"], "overhead_s": r["overhead_s"], "raw_round_s": r["raw_round_s"],
                "server_peak_rss_mib": r["server"].get("peak_rss_mib"),
                "fuse_s": ((r["server"].get("rounds") or [{}])[-1]).get("t_fuse_s"),
                "rounds_complete": all(x.get("accepted") == r["n"] for x in r["server"].get("rounds", [])) or None}
               for r in results]  # fmt: skip
    probes = [] if quick else [connect_probe(1100, nofile=1024)]
    if probes:
        print(table(["probe devices", "mosquitto nofile", "sessions", "connect s", "broker fds", "broker RSS MiB",
                     "broker log"], [[p["n"], p["nofile"] or "20000 (inherited)", p["sessions"], p["connect_s"],
                                      p["broker_fds"], p["broker_peak_rss_mib"], "; ".join(p["broker_log_errors"]) or "-"]
                                     for p in probes]))  # fmt: skip
        print()
    print(table(["N", "connected", "raw round s", "server round s", "server/raw", "growth vs linear",
                 "encode s", "filter+fuse s", "server peak RSS MiB", "RSS after presence MiB", "presence s", "broker fds"], rows))  # fmt: skip
    notes = [f"payload per device per direction ~{proxy * classes * 2 / 1e3:.0f} kB (float16 logits)",
             "round = assignment encode + registry rows + fan-out + collection + validation + persistence; no KD",
             "swarm: one Python process serialises all devices' decode+encode (a simulation cost in both paths)",
             "raw and server both encode the teacher body once per round (codec.FrameEncoder); headers per device"]
    return write_result(NAME, out, quick=quick, params={"ns": ns, "proxy": proxy, "classes": classes, "rounds": rounds,
                        "db": "sqlite", "broker": "mosquitto private, default max_connections"},
                        raw={"rss_mib_per_device": slope, "rounds": results, "connect_probes": probes}, rows=summary,
                        ratios=ratios, notes=notes, started=started, load_start=load0)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_scale")
    p.add_argument("role", choices=["raw", "server", "bench"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--proxy", type=int, default=5000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--db", default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.role == "bench":
        run(quick=a.quick)
        return 0
    res = role_raw(a) if a.role == "raw" else role_server(a)
    sys.stdout.write(json.dumps(res, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
