"""Inference on the device: latency, memory and model swaps of the agent's local endpoint.

Not CI. `python -m bench.device_predict [--quick] [--archs cnn_small,mobilenet_micro]`.

Per architecture, the real agent (`python -m device_firmware_py.cli run`, serving on its Unix
socket) runs under bench/device_class.py's device profile (a cgroup v1 group: 192 MiB memory,
a quarter of one core; device_class.CLASS_CONFIG: low_memory, int8 re-quantization in a child with
the training interpreter released) against a private Mosquitto, and:
  1. a request loop (this process, outside the cgroup: it is the application) asks for predictions
     without pause, batch 1 and 32 in turn, while the agent runs ROUNDS assignments, each ending in
     a re-quantized int8 model swapped in: `swap_failures` = failed requests, `swaps` = models seen
     minus one;
  2. then `p50_ms` / `p99_ms` of N sequential requests at batch 1 and at batch 32 (client-side
     wall time over one keep-alive connection: request encode, socket, agent, answer decode);
  3. `rss_over_numpy_mib`: the agent's resident set (VmRSS) with serving on, after the rounds and
     the latency runs, minus a bare `python -c "import numpy"`; `peak_rss_over_numpy_mib` is its
     VmHWM (which includes the rounds' training), both against the 64 MiB budget.
The rounds are small on purpose (300 private images, 200 proxy images, 1 local epoch): this bench
measures serving, bench/device_class.py measures training.

Writes only the `device_predict` key of bench/results/models_at_work.json (read-modify-write: the
`export` key of that file belongs to another bench).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.device_class import (
    CLASS_CONFIG,
    CPU_QUOTA,
    MEMORY_LIMIT_MIB,
    RSS_BUDGET_OVER_NUMPY_MIB,
    SHAPE,
    Cgroup,
    _proc_hwm,
    baseline_rss_mib,
    cgroups_available,
    private_broker,
    write_device,
)

NAME = "device_predict"
OUT = Path(__file__).resolve().parent / "results" / "models_at_work.json"
ARCHS = ("cnn_small", "mobilenet_micro")
ROUNDS = 3
PRIVATE, PROXY = 300, 200


def _vm_rss(pid: int) -> float | None:
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return None


def _pct(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3), "n": int(len(a))}  # fmt: skip


def measure(arch: str, *, broker: Any, workdir: Path, n_latency: int = 300, timeout_s: float = 900.0) -> dict[str, Any]:
    from device_firmware_py.contract import codec, topics
    from device_firmware_py.contract import messages as cm
    from device_firmware_py.contract.plan import TrainingPlan
    from device_firmware_py.mqtt import MqttClient
    from device_firmware_py.serving.client import DeviceClient

    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = write_device(workdir, arch, PROXY, PRIVATE, broker.url, **CLASS_CONFIG, serve=True,
                            serve_socket=str(workdir / "a.sock"))  # fmt: skip
    cfg = json.loads(cfg_path.read_text())
    dev = cfg["device_id"]
    got: dict[str, list[bytes]] = {}
    mon = MqttClient(f"mon-{os.getpid()}-{arch}", broker.host, broker.port, clean_session=True)
    mon.subscribe(f"{topics.PREFIX}/devices/{dev}/#", 1, lambda t, p: got.setdefault(t, []).append(p))
    if not mon.start(wait_s=10):
        raise RuntimeError("monitor could not connect to the broker")
    limited = cgroups_available()
    cg = Cgroup(MEMORY_LIMIT_MIB if limited else None, CPU_QUOTA if limited else None)
    proc: subprocess.Popen[bytes] | None = None
    out: dict[str, Any] = {"arch": arch, "limited": limited}
    end = time.monotonic() + timeout_s

    def wait(pred: Any, what: str) -> None:
        while not pred():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"agent exited rc={proc.returncode} waiting for {what}: "
                                   f"{(workdir / 'agent.log').read_text()[-1500:]}")  # fmt: skip
            if time.monotonic() > end:
                raise TimeoutError(f"{arch}: timed out waiting for {what}")
            time.sleep(0.05)

    def done_rounds() -> int:
        return sum(codec.decode(p).phase == "done" for p in got.get(topics.device_progress(dev), []))  # type: ignore[union-attr]

    x = np.random.default_rng(0).random((32, *SHAPE), dtype=np.float32)
    stop = threading.Event()
    serials: list[int] = []
    failures: list[str] = []

    def loop() -> None:
        with DeviceClient(str(workdir / "a.sock")) as c:
            i = 0
            while not stop.is_set():
                try:
                    serials.append(c.predict_full(x[: 1 if i % 2 else 32], logits=False)["model"]["serial"])
                except Exception as exc:
                    failures.append(repr(exc)[:300])
                i += 1

    try:
        with cg:
            cmd = [sys.executable, "-m", "device_firmware_py.cli", "run", "--config", str(cfg_path)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            with open(workdir / "agent.log", "ab") as log:
                proc = subprocess.Popen(cg.enter_cmd(cmd) if limited else cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            wait(lambda: (workdir / "a.sock").exists() and bool(got.get(topics.device_status(dev))), "endpoint + status")
            t = threading.Thread(target=loop, daemon=True)
            t.start()
            teacher = np.random.default_rng(1).normal(size=(PROXY, 10)).astype(np.float32)
            for r in range(ROUNDS):
                plan = TrainingPlan(upload=("logits",), local_epochs=1, fkd_epochs=1)
                a = cm.Assignment(r, dev, arch, plan=plan, teacher_logits=teacher, proxy_digest=cfg["proxy_sha256"],
                                  deadline=time.time() + 600)  # fmt: skip
                mon.publish(topics.device_assign(dev), codec.encode_frame(a), 1)
                wait(lambda r=r: done_rounds() > r, f"round {r} done (int8 model swapped in)")
            time.sleep(0.5)
            stop.set()
            t.join(30)
            out.update(swap_failures=len(failures), swap_failure_examples=failures[:3], swap_requests=len(serials),
                       swaps=len(set(serials)) - 1, serials_in_order=serials == sorted(serials))  # fmt: skip
            lat: dict[str, Any] = {}
            with DeviceClient(str(workdir / "a.sock")) as c:
                out["model"] = c.model()
                for b in (1, 32):
                    for _ in range(20):  # warm the connection and the interpreter
                        c.predict(x[:b])
                    ms = []
                    for _ in range(n_latency):
                        t0 = time.perf_counter()
                        c.predict(x[:b])
                        ms.append((time.perf_counter() - t0) * 1e3)
                    lat[f"batch_{b}"] = _pct(ms)
            out.update(lat)
            out["rss_mib"] = _vm_rss(proc.pid)
            out["peak_rss_mib"] = _proc_hwm(proc.pid)
            out["cgroup_memory"] = cg.memory_stats()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        mon.stop()
    return out


def run(quick: bool = False, archs: tuple[str, ...] | None = None, out_path: Path = OUT) -> dict[str, Any]:
    from bench.common import git_sha, machine

    archs = archs or (("cnn_small",) if quick else ARCHS)
    base = baseline_rss_mib()
    rows: dict[str, Any] = {}
    with private_broker() as broker, tempfile.TemporaryDirectory(prefix="kdp-") as tmp:  # short: a socket path
        for arch in archs:
            r = measure(arch, broker=broker, workdir=Path(tmp) / arch, n_latency=100 if quick else 300)
            r["rss_over_numpy_mib"] = round((r["rss_mib"] or 0) - base, 1)
            r["peak_rss_over_numpy_mib"] = round((r["peak_rss_mib"] or 0) - base, 1)
            r["within_budget"] = r["rss_over_numpy_mib"] <= RSS_BUDGET_OVER_NUMPY_MIB
            rows[arch] = r
            print(f"{arch}: batch 1 p50 {r['batch_1']['p50_ms']} ms p99 {r['batch_1']['p99_ms']} ms; batch 32 p50 "
                  f"{r['batch_32']['p50_ms']} ms p99 {r['batch_32']['p99_ms']} ms; RSS +{r['rss_over_numpy_mib']} MiB "
                  f"over numpy (peak +{r['peak_rss_over_numpy_mib']}); swaps {r['swaps']}, failures "
                  f"{r['swap_failures']} of {r['swap_requests']} requests", flush=True)  # fmt: skip
    first = rows[archs[0]]
    section = {
        "p50_ms": {"batch_1": first["batch_1"]["p50_ms"], "batch_32": first["batch_32"]["p50_ms"]},
        "p99_ms": {"batch_1": first["batch_1"]["p99_ms"], "batch_32": first["batch_32"]["p99_ms"]},
        "rss_over_numpy_mib": max(r["rss_over_numpy_mib"] for r in rows.values()),
        "swap_failures": sum(r["swap_failures"] for r in rows.values()),
        "arch": archs[0],
        "archs": rows,
        "params": {"archs": list(archs), "shape": list(SHAPE), "rounds": ROUNDS, "private": PRIVATE, "proxy": PROXY,
                   "class_config": CLASS_CONFIG, "memory_limit_mib": MEMORY_LIMIT_MIB if first["limited"] else None,
                   "cpu_quota": CPU_QUOTA if first["limited"] else None,
                   "rss_budget_over_numpy_mib": RSS_BUDGET_OVER_NUMPY_MIB, "baseline_numpy_rss_mib": base,
                   "quick": quick},  # fmt: skip
        "notes": ["latency: client wall time per request over one keep-alive Unix-socket connection; the agent "
                  "runs under the cgroup's CPU quota (a quarter core), the client outside it",
                  "rss_over_numpy_mib: agent VmRSS with serving on after the rounds and latency runs, minus a bare "
                  "numpy process; peak_rss_over_numpy_mib (per arch) includes the rounds' training",
                  "p50_ms / p99_ms / top-level: the first arch; per arch under archs"],
        "command": "python -m bench.device_predict" + (" --quick" if quick else ""),
        "git_sha": git_sha(), "machine": machine(), "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    from device_firmware_py.fileio import atomic_write

    doc = json.loads(out_path.read_text()) if out_path.is_file() else {}  # read-modify-write: only our key
    doc[NAME] = section
    doc["swap_failures"] = {"failures": section["swap_failures"], "requests": sum(r["swap_requests"] for r in rows.values()),
                            "swaps": sum(r["swaps"] for r in rows.values()),
                            "source": "device_predict.archs (bench/device_predict.py)"}  # fmt: skip
    atomic_write(out_path, (json.dumps(doc, indent=1, default=str) + "\n").encode())
    print(f"wrote {out_path} [{NAME}]")
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="cnn_small only, 100 latency requests per batch size")
    p.add_argument("--archs", help="comma-separated architectures (default: " + ",".join(ARCHS) + ")")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    res = run(a.quick, tuple(a.archs.split(",")) if a.archs else None, a.out)
    return 0 if res["swap_failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
