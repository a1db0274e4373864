"""One device floods the server within its own grants; honest rounds must not notice.

`python -m bench.flood [--quick]` -> bench/results/flood.json (bench, not CI). The stack is the
README's "Production, step by step", on loopback and digits: `koala data prepare`, `koala provision
fleet` (dynamic-security Mosquitto with TLS, per-device accounts bound to their client ids, the
server's settings), Mosquitto from the generated config, `koala serve --config server.toml`, every
bundle flashed in place and its real agent started. The last device of the fleet is the attacker: a
paho client logged in with that device's own account and client id, publishing only where its ACL
lets it, as fast as it can:

  results   result frames with a fresh round id on every message (QoS 1)
  progress  progress messages (QoS 0)
  status    retained status (QoS 1)
  combined  the three one after the other (the mix that once wedged the server until a restart)

Each flood runs while the honest agents run rounds. Per flood (`floods` rows): messages sent,
dropped early by the per-device budget (server /metrics), honest results lost (honest assignments
of rounds that ended without an accepted result), rounds completed / failed from the flood's start
until the first round that starts after it completes, registry rows added, and the server's and the
broker's CPU and the server's peak RSS. Each flood runs twice: with the budget alone
(`quarantine_after = 0`) and as shipped (the broker shuts the flooder out: server_app.quarantine).

The same stack serves tests/reliability/test_flood.py (shorter floods, plus a forced intake stall
through a half-open link that /readyz must report and the watchdog must cure).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DEFAULT_OUT, REPO, git_sha, machine
from server_app.transport.broker import free_port

PY = sys.executable
KINDS = ("results", "progress", "status")


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hwm_mib(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


@dataclass
class Stack:
    """The walk-through's processes on loopback. `start()`, use, `stop()`."""

    work: Path
    devices: int = 5
    server_env: dict[str, str] = field(default_factory=dict)
    via_proxy: bool = False  # the server reaches the broker through a LinkFaultProxy (stall tests)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    proxy: Any = None

    @property
    def ids(self) -> list[str]:
        return [f"pi-{i:02d}" for i in range(1, self.devices + 1)]

    @property
    def honest(self) -> list[str]:
        return self.ids[:-1]

    @property
    def attacker(self) -> str:
        return self.ids[-1]

    def _run(self, *args: str) -> None:
        subprocess.run([PY, "-m", "server_app.cli", *args], cwd=self.work, check=True, capture_output=True, timeout=300)

    def start(self) -> Stack:
        self.work.mkdir(parents=True, exist_ok=True)
        self.tls_port, self.plain_port, self.http_port = free_port(), free_port(), free_port()
        devs = "\n".join(f"  - {{id: {d}, arch: cnn_small, ship_data: data/devices/{d}.npz}}" for d in self.ids)
        (self.work / "fleet.yml").write_text(
            f"name: flood\ndatabase: {{url: \"sqlite:///{self.work}/koala.db\"}}\n"
            f"broker: {{url: \"mqtts://127.0.0.1:{self.tls_port}\", tls_hosts: [127.0.0.1], tls_bind: 127.0.0.1, "
            f"tls_port: {self.tls_port}, plain_port: {self.plain_port}}}\nbundles: {{proxy: data/proxy.npz}}\n"
            f"devices:\n{devs}\n")  # fmt: skip
        self._run("data", "prepare", "--dataset", "digits", "--manifest", "fleet.yml", "--proxy-size", "200", "--out", "data")
        self._run("provision", "fleet", "fleet.yml", "--out", ".")
        try:
            self._start_broker()
            self._start_server()
            for d in self.ids[:-1]:
                self._start_agent(d)
        except BaseException:  # a failed start must not leave a broker or server behind
            self.stop()
            raise
        return self

    def _start_broker(self) -> None:
        from server_app.provisioning.local_broker import find_mosquitto, wait_listening

        conf = self.work / "broker" / "mosquitto.conf"
        log = open(self.work / "broker" / "mosquitto.log", "wb")  # noqa: SIM115 - the child's
        self.procs["broker"] = subprocess.Popen([find_mosquitto() or "mosquitto", "-c", str(conf)], stdout=log, stderr=log)
        for port in (self.tls_port, self.plain_port):
            wait_listening(port, proc=self.procs["broker"])

    def _start_server(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **self.server_env}
        if self.via_proxy:
            from bench.link_fault import LinkFaultProxy

            self.proxy = LinkFaultProxy("127.0.0.1", self.plain_port).start()
            env["KOALA_BROKER__URL"] = self.proxy.url
        log = open(self.work / "server.log", "wb")  # noqa: SIM115 - the child's
        self.procs["server"] = subprocess.Popen(
            [PY, "-m", "server_app.cli", "serve", "--config", "server.toml", "--port", str(self.http_port)],
            cwd=self.work, env=env, stdout=log, stderr=log)  # fmt: skip
        t_end = time.monotonic() + 120
        while self.ready() is None:
            if self.procs["server"].poll() is not None or time.monotonic() > t_end:
                raise RuntimeError(f"server did not start:\n{(self.work / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def _start_agent(self, dev: str) -> None:
        root = self.work / "devices" / dev
        subprocess.run([str(self.work / "bundles" / f"koala-bundle-{dev}" / "flash.sh"), "--target-root", str(root),
                        "--in-place"], check=True, capture_output=True, timeout=60)  # fmt: skip
        log = open(self.work / "devices" / f"{dev}.log", "wb")  # noqa: SIM115 - the child's
        self.procs[dev] = subprocess.Popen([PY, "-m", "device_firmware_py.cli", "run", "--config",
                                            str(root / "etc" / "koala" / "device.json")], stdout=log, stderr=log,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip

    def stop(self) -> None:
        for name in [n for n in self.procs if n not in ("server", "broker")] + ["server", "broker"]:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.proxy is not None:
            self.proxy.close()

    # ------------------------------------------------------------------ reading the stack
    def api(self, path: str) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        token = (self.work / "api.token").read_text().strip()
        req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def ready(self) -> dict[str, Any] | None:
        """/readyz as a dict (status ok | degraded), None while the server does not answer."""
        code, body = self.api("/readyz")
        return json.loads(body) if code in (200, 503) else None

    def metric(self, name: str) -> dict[str, float]:
        """label string -> value of one metric family on /metrics."""
        _, body = self.api("/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith(name) and not line.startswith("#"):
                key, _, v = line.rpartition(" ")
                out[key[len(name):]] = float(v)
        return out

    def db(self, sql: str) -> list[tuple[Any, ...]]:
        import sqlite3

        with sqlite3.connect(self.work / "koala.db", timeout=30) as c:
            return list(c.execute(sql))

    def rows(self) -> int:
        """Rows of the registry tables a device's messages can add to."""
        return sum(self.db(f"select count(*) from {t}")[0][0] for t in ("events", "assignments", "devices"))

    def rounds(self) -> dict[int, tuple[str, str | None]]:
        return {r: (s, e) for r, s, e in self.db("select id, state, error from rounds")}

    def honest_outcomes(self, first_round: int) -> dict[str, int]:
        """Assignment statuses of honest devices in finished rounds from `first_round` on."""
        names = ",".join(f"'{d}'" for d in self.honest)
        rows = self.db(f"select a.status, count(*) from assignments a join rounds r on r.id = a.round_id where "
                       f"a.round_id >= {first_round} and a.device_id in ({names}) and r.state in "
                       f"('completed', 'failed') group by a.status")  # fmt: skip
        return dict(rows)

    def wait_rounds_done(self, n: int, timeout_s: float) -> bool:
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            if sum(1 for s, _ in self.rounds().values() if s == "completed") >= n:
                return True
            time.sleep(0.5)
        return False


class Attacker:
    """A device's own account and bound client id, publishing as fast as its socket takes it.
    Reconnects whenever the broker lets it (a quarantined account is refused until it is lifted)."""

    def __init__(self, stack: Stack) -> None:
        import paho.mqtt.client as mqtt

        self.dev = stack.attacker
        root = stack.work / "bundles" / f"koala-bundle-{self.dev}" / "etc" / "koala"
        from device_firmware_py.contract.topics import device_client_id

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_client_id(self.dev), protocol=mqtt.MQTTv311)
        c.username_pw_set(self.dev, (root / "device.secret").read_text().strip())
        c.tls_set(ca_certs=str(root / "ca.crt"))
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(2000)
        c.reconnect_delay_set(0.2, 1.0)
        self.connects = 0
        self.refusals = 0

        def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            if rc.is_failure:
                self.refusals += 1
            else:
                self.connects += 1

        c.on_connect = on_connect
        c.connect_async("127.0.0.1", stack.tls_port)
        c.loop_start()
        self.c = c
        self.sent: dict[str, int] = dict.fromkeys(KINDS, 0)

    def flood(self, kind: str, seconds: float) -> int:
        from device_firmware_py.contract import codec, topics
        from device_firmware_py.contract import messages as cm

        dev, n, t_end = self.dev, 0, time.monotonic() + seconds
        logits = np.zeros((200, 10), np.float32)
        while time.monotonic() < t_end:
            if not self.c.is_connected():
                time.sleep(0.05)
                continue
            if kind == "results":
                msg = cm.Result(round_id=100_000 + n, device_id=dev, arch="cnn_small", num_samples=100, model_version=0,
                                label_histogram=[10] * 10, metrics={}, proxy_digest="0" * 64, proxy_logits=logits)  # fmt: skip
                info = self.c.publish(topics.device_result(dev), codec.encode_frame(msg), qos=1)
            elif kind == "progress":
                msg = cm.Progress(device_id=dev, round_id=n % 1000, phase="train", step=n, total=10**9)
                info = self.c.publish(topics.device_progress(dev), codec.encode_control(msg), qos=0)
            else:
                msg = cm.DeviceStatus(device_id=dev, state="online", arch="cnn_small", input_shape=[8, 8, 1],
                                      runtime_version="flood", num_samples=n % 1000 + 1, label_histogram=None)  # fmt: skip
                info = self.c.publish(topics.device_status(dev), codec.encode_control(msg), qos=1, retain=True)
            if info.rc == 0:
                n += 1
            else:
                time.sleep(0.002)  # paho's queue is full: the socket is the limit
        self.sent[kind] += n
        return n

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def run_flood(stack: Stack, attacker: Attacker, kinds: tuple[str, ...], seconds: float, settle_s: float = 120.0) -> dict[str, Any]:
    """One flood while rounds run; measured until the first round that starts after it completes."""
    first = max(stack.rounds() or {0: None}) + 1  # rounds that start from now on
    rows0 = stack.rows()
    dropped0 = stack.metric("koala_ingest_dropped_by_kind_total")
    cpu0 = {k: _cpu_s(stack.procs[k].pid) for k in ("server", "broker")}
    sent0 = sum(attacker.sent.values())
    t0 = time.monotonic()
    for kind in kinds:
        attacker.flood(kind, seconds)
    flood_s = time.monotonic() - t0
    after = max(stack.rounds() or {0: None}) + 1
    t_end = time.monotonic() + settle_s
    while time.monotonic() < t_end:  # a round that started after the flood completed: the fleet is back
        rs = stack.rounds()
        if any(r >= after and s == "completed" for r, (s, _e) in rs.items()):
            break
        time.sleep(0.5)
    cpu = {k: _cpu_s(stack.procs[k].pid) - cpu0[k] for k in cpu0}
    dropped1 = stack.metric("koala_ingest_dropped_by_kind_total")
    rs = stack.rounds()
    done = {r: s for r, (s, _e) in rs.items() if r >= first and s in ("completed", "failed")}
    outcomes = stack.honest_outcomes(first)
    sent = sum(attacker.sent.values()) - sent0
    dropped = int(sum(dropped1.values()) - sum(dropped0.values()))
    return {
        "kind": "+".join(kinds) if len(kinds) > 1 else kinds[0], "seconds": round(flood_s, 1), "sent": sent,
        "sent_per_s": round(sent / flood_s), "dropped_early": dropped,
        "honest_lost": sum(n for st, n in outcomes.items() if st != "accepted"),
        "honest_accepted": outcomes.get("accepted", 0), "honest_outcomes": outcomes,
        "rounds_completed": sum(1 for s in done.values() if s == "completed"),
        "rounds_failed": sum(1 for s in done.values() if s == "failed"),
        "failed_errors": sorted({rs[r][1] or "" for r, s in done.items() if s == "failed"}),
        "registry_rows_added": stack.rows() - rows0,
        "server_cpu_s": round(cpu["server"], 2), "broker_cpu_s": round(cpu["broker"], 2),
        "server_peak_rss_mib": _hwm_mib(stack.procs["server"].pid),
        "cpu_us_per_dropped": round(cpu["server"] / dropped * 1e6, 1) if dropped > 500 else None,
        "broker_cpu_us_per_msg": round(cpu["broker"] / sent * 1e6, 1) if sent else None,
        "attacker_refused_connects": attacker.refusals,
    }


def measure(work: Path, *, quarantine: bool, seconds: float, devices: int = 5) -> list[dict[str, Any]]:
    """Every flood kind and the combined one on one stack (budget alone, or with quarantine)."""
    env = {"KOALA_POLICY__ROUNDS": "100000", "KOALA_POLICY__DEADLINE_S": "30", "KOALA_POLICY__MIN_DEVICES": "2",
           "KOALA_INGEST__QUARANTINE_S": "10"}  # fmt: skip
    if not quarantine:
        env["KOALA_INGEST__QUARANTINE_AFTER"] = "0"
    stack = Stack(work, devices=devices, server_env=env).start()
    rows = []
    try:
        if not stack.wait_rounds_done(2, 300):
            raise RuntimeError("honest rounds did not start")
        attacker = Attacker(stack)
        for kinds in [(k,) for k in KINDS] + [KINDS]:
            row = run_flood(stack, attacker, kinds, seconds)
            row["mode"] = "budget+quarantine" if quarantine else "budget only"
            print(json.dumps(row), flush=True)
            rows.append(row)
            time.sleep(12 if quarantine else 2)  # let a quarantine lapse before the next flood
        attacker.close()
    finally:
        stack.stop()
    return rows


def drop_cost(work: Path, seconds: float) -> dict[str, Any]:
    """What an over-budget message costs the server and the broker, with nothing else running:
    no round starts (min_devices above the fleet), no quarantine, one kind of flood at a time."""
    env = {"KOALA_POLICY__MIN_DEVICES": "100", "KOALA_INGEST__QUARANTINE_AFTER": "0"}
    stack = Stack(work, devices=2, server_env=env).start()
    out: dict[str, Any] = {}
    try:
        time.sleep(5)
        attacker = Attacker(stack)
        for kind in KINDS:
            d0 = stack.metric("koala_ingest_dropped_by_kind_total")
            cpu0 = {k: _cpu_s(stack.procs[k].pid) for k in ("server", "broker")}
            sent = attacker.flood(kind, seconds)
            time.sleep(3)  # the broker hands over what it still holds
            cpu = {k: _cpu_s(stack.procs[k].pid) - cpu0[k] for k in cpu0}
            d1 = stack.metric("koala_ingest_dropped_by_kind_total")
            dropped = int(sum(d1.values()) - sum(d0.values()))
            out[kind] = {"sent": sent, "dropped": dropped, "server_cpu_s": round(cpu["server"], 2),
                         "cpu_us_per_dropped": round(cpu["server"] / max(dropped, 1) * 1e6, 1),
                         "broker_cpu_us_per_msg": round(cpu["broker"] / max(sent, 1) * 1e6, 1)}  # fmt: skip
            print(kind, json.dumps(out[kind]), flush=True)
        attacker.close()
    finally:
        stack.stop()
    return out


def ingest_cost(work: Path, m: int = 1000) -> dict[str, Any]:
    """Server CPU per accepted 100 kB result (5,000 x 10 float16 logits): `Ingestor.ingest_batch`
    in batches as the worker calls it, with its stages timed alone (bench.ingestion.stage_breakdown)."""
    from bench.ingestion import stage_breakdown
    from server_app.transport.broker import MosquittoBroker

    work.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(persistence=False).start()
    try:
        r = stage_breakdown(f"sqlite:///{work}/ingest.db", broker.port, m, 5000, 10, "float16")
    finally:
        broker.stop()
    scale = 100_000 / r["payload_bytes"]
    return {"messages": m, "payload_bytes": r["payload_bytes"],
            "cpu_ms_per_result_100k": round(r["cpu_ms_per_msg"] * scale, 3),
            "wall_ms_per_result": round(r["ms_per_msg_total"], 3), "wall_ms_decode_validate": round(r["ms_decode_validate"], 3),
            "wall_ms_segment_write_fsync": round(r["ms_segment_write_fsync"], 3),
            "wall_ms_registry_rest": round(r["ms_registry_rest"], 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 s floods instead of 20 s")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT / "flood.json")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_flood")
    ap.add_argument("--only", choices=("floods", "cost"), help="re-measure only the floods, or only the per-message costs")
    a = ap.parse_args(argv)
    seconds = 5.0 if a.quick else 20.0
    import shutil

    doc: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() else {}
    doc.update({"name": "flood", "date": time.strftime("%Y-%m-%d"), "git_sha": git_sha(), "machine": machine(),
                "params": {"flood_s": seconds, "devices": 5, "dataset": "digits"}})  # fmt: skip
    if a.only != "cost":
        rows: list[dict[str, Any]] = []
        for q in (False, True):
            w = a.work / ("quarantine" if q else "budget")
            shutil.rmtree(w, ignore_errors=True)
            rows += measure(w, quarantine=q, seconds=seconds)
        doc["floods"] = rows
    if a.only != "floods":
        shutil.rmtree(a.work / "cost", ignore_errors=True)
        cost = drop_cost(a.work / "cost", seconds)
        ingest = ingest_cost(a.work / "ingest")
        sent = sum(c["sent"] for c in cost.values())
        doc.update({
            "drop_cost": cost, "ingest": ingest, "cpu_ms_per_result_100k": ingest["cpu_ms_per_result_100k"],
            "cpu_us_per_dropped": round(sum(c["server_cpu_s"] for c in cost.values())
                                        / max(1, sum(c["dropped"] for c in cost.values())) * 1e6, 1),
            "broker_cpu_us_per_msg": round(sum(c["broker_cpu_us_per_msg"] * c["sent"] for c in cost.values())
                                           / max(1, sent), 1),
        })  # fmt: skip
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench.flood"
    raise SystemExit(main())
