"""Device class: one real agent round per architecture under a Raspberry-Pi-class memory and CPU limit.

Each round is the real thing: a private Mosquitto, the device agent as its own OS process
(`python -m device_firmware_py.cli run`, memory-mapped data, int8 re-quantization in a child
process), an assignment with teacher logits for the demo's proxy size (1,000 images 28x28x1, also
5,000 in full mode) and the default policy's plan (1 forward-KD epoch, 5 local epochs), and the
result it publishes. The agent is started inside a cgroup v1 group (memory.limit_in_bytes and
cpu.cfs_quota_us) before it allocates anything, so the limits hold for the agent and its
quantizer child.

Measured per architecture:
  peak_rss_mib        the agent's VmHWM after its round (training, logits, serving the int8 model)
  baseline_rss_mib    a bare `python -c "import numpy"` in the same run
  quantizer_peak_mib  the short-lived int8 quantizer child's VmHWM (it exits before the next round)
  cgroup_max_usage_mib, cgroup_failcnt, oom_kills   what the memory group saw (usage includes page cache)
  round_s             assignment published -> result received, under the CPU quota (deadline: 120 s)
  progress            progress messages received during the round (phase, step/total)
install_mb: the device extra's installed dependency closure (bench.device_footprint.closure_size).
The agent runs with CLASS_CONFIG (low_memory: one training phase's LiteRT interpreter at a time);
VARIANTS adds rounds with other device settings at the demo's proxy size (mobilenet_tiny+builtin:
no XNNPACK). `--archs-only` runs just the architecture rounds and merges them into the existing
device_class.json (its link profiles kept).

Link profiles (raw.profiles; bench/link_profiles.py): the demo's stack (server, private Mosquitto,
two agents) with each agent behind its own LinkFaultProxy -- loopback (the baseline, same run),
wifi, cellular (with a 30 s outage mid-upload), flapping, half_open -- and per profile the rounds
completed, results lost, duplicates, seconds and bytes per round. `--profiles-only` runs just these
and merges them into the existing device_class.json (the architecture rounds are kept as they are).

Needs root and cgroup v1 (/sys/fs/cgroup/memory, /sys/fs/cgroup/cpu); without them the rounds run
unconstrained and the result says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

NAME = "device_class"
ARCHS = ("mlp_tiny", "cnn_small", "mobilenet_tiny", "mobilenet_micro")
SHAPE = (28, 28, 1)
MEMORY_LIMIT_MIB = 192
CPU_QUOTA = 0.25  # a quarter of one core
DEADLINE_S = 120.0  # KoalaPolicy.deadline_s default
RSS_BUDGET_OVER_NUMPY_MIB = 64
# The device-class settings of the agent: int8 re-quantization in a child process, with the training
# interpreter released meanwhile (mobilenet_tiny's ~145 MiB agent + the ~88 MiB quantizer child
# do not fit 192 MiB together: measured, the OOM killer took the agent without this), and one
# training phase's interpreter at a time (low_memory: forward KD and local training no longer hold
# both batch-32 activation arenas; weights and Adam state carried, bit-identical numbers).
CLASS_CONFIG: dict[str, Any] = {"quantize": True, "quantize_isolated": True, "release_before_quantize": True,
                                "low_memory": True}
# Extra rounds at the demo's proxy size: (label, arch, device config). Builtin kernels instead of
# XNNPACK: smaller arenas, slower steps, last-bit-different weights.
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (("builtin", "mobilenet_tiny", {"xnnpack": False}),)
CG_ROOT = Path("/sys/fs/cgroup")


# ------------------------------------------------------------------------------------ cgroup v1
def cgroups_available() -> bool:
    return os.geteuid() == 0 and all(os.access(CG_ROOT / c, os.W_OK) for c in ("memory", "cpu"))


class Cgroup:
    """A cgroup v1 memory + cpu group; `enter_cmd(cmd)` runs cmd inside it from its first byte."""

    def __init__(
        self, memory_mib: int | None = None, cpu_quota: float | None = None, name: str | None = None
    ):
        self.name = name or f"koala-test-{secrets.token_hex(4)}"
        self.dirs: list[Path] = []
        self.memory_mib, self.cpu_quota = memory_mib, cpu_quota

    def __enter__(self) -> Cgroup:
        if self.memory_mib is not None:
            d = CG_ROOT / "memory" / self.name
            d.mkdir()
            self.dirs.append(d)
            (d / "memory.limit_in_bytes").write_text(str(self.memory_mib << 20))
            with contextlib.suppress(OSError):  # no swap accounting on some kernels
                (d / "memory.memsw.limit_in_bytes").write_text(str(self.memory_mib << 20))
        if self.cpu_quota is not None:
            d = CG_ROOT / "cpu" / self.name
            d.mkdir()
            self.dirs.append(d)
            (d / "cpu.cfs_period_us").write_text("100000")
            (d / "cpu.cfs_quota_us").write_text(str(int(self.cpu_quota * 100000)))
        return self

    def enter_cmd(self, cmd: list[str]) -> list[str]:
        """`sh -c` that writes its own pid into every group, then execs cmd (so children inherit them)."""
        joins = " && ".join(f"echo $$ > {d / 'cgroup.procs'}" for d in self.dirs) or "true"
        return ["sh", "-c", f'{joins} && exec "$@"', "sh", *cmd]

    def memory_stats(self) -> dict[str, Any]:
        d = CG_ROOT / "memory" / self.name
        if not d.is_dir():
            return {}
        oom = dict(ln.split() for ln in (d / "memory.oom_control").read_text().splitlines())
        return {"limit_mib": self.memory_mib, "max_usage_mib": int((d / "memory.max_usage_in_bytes").read_text()) / 2**20,
                "failcnt": int((d / "memory.failcnt").read_text()), "oom_kills": int(oom.get("oom_kill", 0))}  # fmt: skip

    def cpu_stats(self) -> dict[str, Any]:
        d = CG_ROOT / "cpu" / self.name
        if not d.is_dir():
            return {}
        st = dict(ln.split() for ln in (d / "cpu.stat").read_text().splitlines())
        return {"quota": self.cpu_quota, "nr_throttled": int(st.get("nr_throttled", 0)),
                "throttled_s": int(st.get("throttled_time", 0)) / 1e9}  # fmt: skip

    def __exit__(self, *exc: Any) -> None:
        for d in self.dirs:
            procs = (d / "cgroup.procs").read_text().split() if d.is_dir() else []
            for pid in procs:  # only processes this group's command started
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


# ----------------------------------------------------------------------------- device files
def _savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_device(
    workdir: Path, arch: str, proxy: int, private: int, broker_url: str, seed: int = 0, **cfg: Any
) -> Path:
    """Synthetic 28x28x1 private data (labels learnable: class-dependent mean), a proxy set and a config."""
    from device_firmware_py.config import file_sha256

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, private)
    x = (rng.random((private, *SHAPE), dtype=np.float32) * 0.5 + (y[:, None, None, None] / 20)).astype(
        np.float32
    )
    _savez(workdir / "private.npz", x=x, y=y)
    _savez(workdir / "proxy.npz", x=rng.random((proxy, *SHAPE), dtype=np.float32))
    conf = {"device_id": "dev000", "arch": arch, "data_path": str(workdir / "private.npz"),
            "proxy_path": str(workdir / "proxy.npz"), "proxy_sha256": file_sha256(workdir / "proxy.npz"),
            "state_dir": str(workdir / "state"), "broker_url": broker_url, "num_threads": 1,
            "client_id": f"koala-dev-{secrets.token_hex(3)}", "keepalive_s": 15, **cfg}  # fmt: skip
    p = workdir / "config.json"
    p.write_text(json.dumps(conf))
    return p


def _proc_hwm(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) / 1024
    return None


def baseline_rss_mib() -> float:
    code = ("from pathlib import Path;import numpy;print([int(l.split()[1])/1024 for l in "
            "Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0])")  # fmt: skip
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


# ------------------------------------------------------------------------------ one agent round
@contextlib.contextmanager
def private_broker() -> Iterator[Any]:
    from server_app.transport.broker import MosquittoBroker

    b = MosquittoBroker()
    b.start()
    try:
        yield b
    finally:
        b.stop()


def agent_round(arch: str, *, broker: Any, workdir: Path, proxy: int = 1000, private: int = 600,
                memory_mib: int | None = MEMORY_LIMIT_MIB, cpu_quota: float | None = CPU_QUOTA,
                local_epochs: int = 5, fkd_epochs: int = 1, device_config: dict[str, Any] | None = None,
                timeout_s: float = 600.0) -> dict[str, Any]:  # fmt: skip
    """Start one agent (inside a cgroup when limits are given and possible), give it one
    assignment, wait for its result and its int8 model; report memory, time and progress."""
    from device_firmware_py.contract import codec, topics
    from device_firmware_py.contract import messages as cm
    from device_firmware_py.contract.plan import TrainingPlan
    from device_firmware_py.mqtt import MqttClient

    workdir.mkdir(parents=True, exist_ok=True)
    dcfg = {**CLASS_CONFIG, **(device_config or {})}
    quantize = bool(dcfg["quantize"])
    cfg_path = write_device(workdir, arch, proxy, private, broker.url, **dcfg)
    cfg = json.loads(cfg_path.read_text())
    dev = cfg["device_id"]
    got: dict[str, list[tuple[float, bytes]]] = {}
    mon = MqttClient(f"mon-{secrets.token_hex(3)}", broker.host, broker.port, clean_session=True)
    mon.subscribe(
        f"{topics.PREFIX}/devices/{dev}/#",
        1,
        lambda t, p: got.setdefault(t, []).append((time.monotonic(), p)),
    )
    if not mon.start(wait_s=10):
        raise RuntimeError("monitor could not connect to the broker")
    limited = cgroups_available() and (memory_mib is not None or cpu_quota is not None)
    cg = Cgroup(memory_mib if limited else None, cpu_quota if limited else None)
    log_path = workdir / "agent.log"
    out: dict[str, Any] = {"arch": arch, "proxy": proxy, "private": private, "local_epochs": local_epochs,
                           "fkd_epochs": fkd_epochs, "limited": limited, "device_config": dcfg}  # fmt: skip
    proc: subprocess.Popen[bytes] | None = None

    def status() -> cm.DeviceStatus | None:
        ps = [p for _, p in got.get(topics.device_status(dev), []) if p]
        return codec.decode(ps[-1]) if ps else None  # type: ignore[return-value]

    def progress() -> list[cm.Progress]:
        return [codec.decode(p) for _, p in got.get(topics.device_progress(dev), [])]  # type: ignore[misc]

    def wait(pred: Any, what: str, until: float) -> None:
        while not pred():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"agent exited rc={proc.returncode} waiting for {what}: {log_path.read_text()[-1500:]}"
                )
            if time.monotonic() > until:
                raise TimeoutError(f"{arch}: timed out waiting for {what}")
            time.sleep(0.05)

    try:
        with cg:
            cmd = [
                sys.executable,
                "-m",
                "device_firmware_py.cli",
                "--debug",
                "run",
                "--config",
                str(cfg_path),
            ]
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            }
            t_start = time.monotonic()
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    cg.enter_cmd(cmd) if limited else cmd, stdout=log, stderr=subprocess.STDOUT, env=env
                )
            end = t_start + timeout_s
            wait(lambda: (s := status()) is not None and s.state == "online", "online status", end)
            out["t_ready_s"] = time.monotonic() - t_start
            teacher = np.random.default_rng(1).normal(size=(proxy, 10)).astype(np.float32)
            plan = TrainingPlan(upload=("logits",), local_epochs=local_epochs, fkd_epochs=fkd_epochs)
            a = cm.Assignment(0, dev, arch, plan=plan, teacher_logits=teacher, proxy_digest=cfg["proxy_sha256"],
                              deadline=time.time() + DEADLINE_S)  # fmt: skip
            frame = codec.encode_frame(a)
            t0 = time.monotonic()
            mon.publish(topics.device_assign(dev), frame, 1)
            rt = topics.device_result(dev)
            wait(lambda: bool(got.get(rt)), "result", end)
            t_res, payload = got[rt][0]
            res = codec.decode_for_topic(rt, payload)[1]
            out.update(round_s=t_res - t0, within_deadline=t_res - t0 <= DEADLINE_S, result_bytes=len(payload),
                       assignment_bytes=len(frame), t_device_s=res.metrics.get("t_device_s"),
                       logits_shape=list(res.proxy_logits.shape))  # fmt: skip
            wait(lambda: any(p.phase == "done" for p in progress()), "round done (int8 model served)", end)
            out["t_done_s"] = time.monotonic() - t0
            wait(lambda: (s := status()) is not None and "int8_bytes" in s.capabilities if quantize else True,
                 "status with the int8 model", end)  # fmt: skip
            caps = status().capabilities  # type: ignore[union-attr]
            out["peak_rss_mib"] = _proc_hwm(proc.pid)  # the exec'd agent keeps the shell's pid
            out["status_peak_rss_mib"] = caps.get("peak_rss_mib")
            out["quantizer_peak_mib"] = caps.get("int8_child_peak_rss_mib")
            out["int8_bytes"] = caps.get("int8_bytes")
            msgs = progress()
            out["progress"] = {"messages": len(msgs), "phases": sorted({p.phase for p in msgs}),
                               "max_per_s": _max_rate([t for t, _ in got.get(topics.device_progress(dev), [])]),
                               "train_steps_reported": [[p.step, p.total] for p in msgs if p.phase == "train"][-3:]}  # fmt: skip
            out["cgroup_memory"] = cg.memory_stats()
            out["cgroup_cpu"] = cg.cpu_stats()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out["agent_exit"] = proc.returncode
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        mon.stop()
    return out


def _max_rate(ts: list[float]) -> int:
    """Most messages inside any 1-second window."""
    ts = sorted(ts)
    best, j = 0, 0
    for i, t in enumerate(ts):
        while ts[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


# ---------------------------------------------------------------------------------------- run
def run(quick: bool = False, out: Path | None = None, profiles_only: bool = False, archs_only: bool = False) -> dict[str, Any]:
    from bench.common import DEFAULT_OUT, table, write_result
    from bench.device_footprint import closure_size

    started, load0 = time.time(), os.getloadavg()
    out = out or DEFAULT_OUT
    if profiles_only:
        return merge_profiles(out, quick=quick)
    archs = ("cnn_small",) if quick else ARCHS
    proxies = (1000,) if quick else (1000, 5000)
    base = baseline_rss_mib()
    limited = cgroups_available()
    rows: list[dict[str, Any]] = []
    plan: list[tuple[str, str, int, dict[str, Any] | None]] = [(a, a, p, None) for p in proxies for a in archs]
    plan += [] if quick else [(f"{a}+{label}", a, 1000, cfg) for label, a, cfg in VARIANTS]
    with private_broker() as broker, tempfile.TemporaryDirectory(prefix="koala-bench-devclass-") as tmp:
        for key, arch, proxy, cfg in plan:
            r = agent_round(arch, broker=broker, workdir=Path(tmp) / f"{key}-{proxy}", proxy=proxy, device_config=cfg)
            r["key"] = f"{key}@{proxy}"
            r["baseline_rss_mib"] = base
            r["rss_over_baseline_mib"] = (r["peak_rss_mib"] or 0) - base
            r["within_rss_budget"] = r["rss_over_baseline_mib"] <= RSS_BUDGET_OVER_NUMPY_MIB
            rows.append(r)
            print(f"{key} proxy={proxy}: round {r['round_s']:.1f} s, peak RSS {r['peak_rss_mib']:.1f} MiB "
                  f"(+{r['rss_over_baseline_mib']:.1f} over numpy), quantizer {r['quantizer_peak_mib']} MiB", flush=True)  # fmt: skip
    install = closure_size("koala-edge", "device")
    install_mb = install["bytes"] / 1e6
    print(table(["arch", "proxy", "peak RSS MiB", "baseline MiB", "over baseline", "quantizer child MiB",
                 "cgroup max MiB", "OOM kills", "round s (1/4 core)", "done s (incl. int8)", "progress msgs"],
                [[r["key"].split("@")[0], r["proxy"], r["peak_rss_mib"], r["baseline_rss_mib"], r["rss_over_baseline_mib"],
                  r["quantizer_peak_mib"], r["cgroup_memory"].get("max_usage_mib"), r["cgroup_memory"].get("oom_kills"),
                  r["round_s"], r["t_done_s"], r["progress"]["messages"]] for r in rows]))  # fmt: skip
    print(f"\ndevice install {install_mb:.1f} MB ({install['packages']} packages); limits: "
          f"{'memory ' + str(MEMORY_LIMIT_MIB) + ' MiB, cpu ' + str(CPU_QUOTA) + ' core' if limited else 'none (no cgroup v1 / not root)'}")  # fmt: skip
    archs_doc = {r["key"]: {k: r.get(k) for k in ("peak_rss_mib", "baseline_rss_mib", "rss_over_baseline_mib",
                 "within_rss_budget", "quantizer_peak_mib", "round_s", "t_done_s", "within_deadline")} for r in rows}  # fmt: skip
    ratios = {f"rss/{k}/over_baseline_mib": v["rss_over_baseline_mib"] for k, v in archs_doc.items()}
    ratios.update({f"time/{k}/round_s_quarter_core": v["round_s"] for k, v in archs_doc.items()})
    arch_params = {"archs": archs, "proxies": proxies, "variants": [[f"{a}+{label}", cfg] for label, a, cfg in VARIANTS],
                   "class_config": CLASS_CONFIG, "shape": list(SHAPE), "private": 600,
                   "memory_limit_mib": MEMORY_LIMIT_MIB if limited else None,
                   "cpu_quota": CPU_QUOTA if limited else None, "deadline_s": DEADLINE_S,
                   "rss_budget_over_numpy_mib": RSS_BUDGET_OVER_NUMPY_MIB,
                   "plan": {"fkd_epochs": 1, "local_epochs": 5, "upload": ["logits"]}}  # fmt: skip
    arch_raw = {"architectures": archs_doc, "rounds": rows, "install_mb": install_mb, "install": install,
                "baseline_rss_mib": base}  # fmt: skip
    if archs_only:
        return merge_archs(out, quick, arch_params, arch_raw, ratios, started, load0)
    profiles = run_profiles(quick)
    ratios.update(profile_ratios(profiles))
    return write_result(NAME, out, quick=quick,
                        params={**arch_params, "profiles": profile_params(quick)},
                        raw={**arch_raw, "profiles": profiles},
                        ratios=ratios,
                        notes=[*ARCH_NOTES, *PROFILE_NOTES],
                        started=started, load_start=load0)  # fmt: skip


ARCH_NOTES = [
    "peak_rss_mib: the agent process's VmHWM (memory-mapped data pages it touched count)",
    "quantizer_peak_mib: the int8 re-quantization child (ai-edge-quantizer), a separate short-lived process; both ran "
    "inside the same memory cgroup",
    "low_memory (params.class_config): the agent opens a fresh LiteRT interpreter per training phase (forward KD, local "
    "training) and carries weights + Adam state between them (get_state/set_state signatures added in memory to the "
    "unchanged artifact; the state model is made once by a child process into state_dir/cache); keys NAME+builtin: "
    "the same round with xnnpack false (builtin kernels)",
]


def merge_archs(out: Path, quick: bool, params: dict[str, Any], raw: dict[str, Any], ratios: dict[str, Any],
                started: float, load0: tuple[float, float, float]) -> dict[str, Any]:  # fmt: skip
    """--archs-only: put the architecture rounds into the existing device_class(.quick).json, keeping
    its link profiles (raw.profiles, params.profiles, profiles_provenance, link/ ratios and notes)."""
    from bench.common import git_sha, machine

    path = out / (f"{NAME}.quick.json" if quick else f"{NAME}.json")
    doc: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"benchmark": NAME, "raw": {}}
    doc.update({
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_sha": git_sha(), "quick": quick,
        "command": f"koala bench {NAME} --archs-only" + (" --quick" if quick else ""),
        "wall_s": round(time.time() - started, 2), "machine": {**machine(), "loadavg_start": list(load0)},
    })  # fmt: skip
    doc["params"] = {**params, **({"profiles": doc["params"]["profiles"]} if "profiles" in doc.get("params", {}) else {})}
    doc["raw"] = {**raw, **({"profiles": doc["raw"]["profiles"]} if "profiles" in doc.get("raw", {}) else {})}
    doc["ratios"] = {**ratios, **{k: v for k, v in doc.get("ratios", {}).items() if k.startswith("link/")}}
    doc["notes"] = [*ARCH_NOTES, *(n for n in doc.get("notes", []) if n.startswith("profiles"))]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    doc["path"] = str(path)
    return doc


# ------------------------------------------------------------------------------ link profiles
PROFILE_NAMES = ("loopback", "wifi", "cellular", "flapping", "half_open")
PROFILE_FLEET: dict[str, Any] = {"dataset": "fashion-mnist", "devices": 2, "rounds": 3, "proxy_size": 1000,
                                 "train_size": 1200, "test_size": 500, "deadline_s": 120.0}  # fmt: skip
# --quick: digits (8x8x1), one round, the two profiles without long faults
PROFILE_FLEET_QUICK: dict[str, Any] = {"dataset": "digits", "devices": 2, "rounds": 1, "proxy_size": 200,
                                       "train_size": None, "test_size": 200, "deadline_s": 60.0}  # fmt: skip
PROFILE_NOTES = (
    "profiles: the demo's stack (real server + Mosquitto, agents as OS processes), each agent behind its own "
    "LinkFaultProxy (bench/link_fault.py); delay is one way (round trip twice it); cellular's outage and half_open's "
    "silence begin 1,000 bytes into each device's first result upload",
    "profiles: results_lost = participants without an accepted result; duplicates = results accepted more than "
    "once; redeliveries = copies the server recognised as the same bytes (QoS 1 resend, agent re-publish)",
    "profiles: bytes_per_round = bytes the device links carried both ways (all devices, MQTT overhead, status and "
    "progress included); seconds_per_round = mean t_round_wall_s (assignment -> aggregated and evaluated)",
)


def profile_params(quick: bool) -> dict[str, Any]:
    from bench.link_profiles import PROFILES

    names = PROFILE_NAMES[:2] if quick else PROFILE_NAMES
    return {"fleet": PROFILE_FLEET_QUICK if quick else PROFILE_FLEET,
            "links": {n: PROFILES[n].summary() for n in names}}  # fmt: skip


def run_profiles(quick: bool = False, names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Each link profile's rounds (bench/link_profiles.py), as the rows of raw.profiles."""
    from dataclasses import asdict

    from bench.common import table
    from bench.link_profiles import PROFILES, run_profile

    names = names or (PROFILE_NAMES[:2] if quick else PROFILE_NAMES)
    fleet = PROFILE_FLEET_QUICK if quick else PROFILE_FLEET
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="koala-bench-links-") as tmp:
        # Unmeasured warm-up: the first round in this process pays one-time costs (lazy imports,
        # torch's first kernels: 6.6 s vs 0.8 s measured), which would otherwise land on the baseline.
        run_profile(PROFILES["loopback"], Path(tmp) / "warmup", **PROFILE_FLEET_QUICK)
        for name in names:
            r = asdict(run_profile(PROFILES[name], Path(tmp) / name, **fleet))
            r["description"] = PROFILES[name].description
            rows.append(r)
            print(f"link {name}: {r['rounds_completed']}/{r['rounds']} rounds, lost {r['results_lost']}, "
                  f"duplicates {r['duplicates']}, redeliveries {r['redeliveries']}, "
                  f"{r['seconds_per_round'] or 0:.1f} s and {(r['bytes_per_round'] or 0) / 1e3:.0f} kB per round", flush=True)  # fmt: skip
    print(table(["profile", "rounds completed", "results lost", "duplicates", "redeliveries", "s / round",
                 "kB / round", "link"],
                [[r["name"], f"{r['rounds_completed']}/{r['rounds']}", r["results_lost"], r["duplicates"],
                  r["redeliveries"], r["seconds_per_round"], (r["bytes_per_round"] or 0) / 1e3, r["description"]]
                 for r in rows]))  # fmt: skip
    return rows


def profile_ratios(profiles: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in profiles:
        out[f"link/{r['name']}/seconds_per_round"] = r["seconds_per_round"]
        out[f"link/{r['name']}/bytes_per_round"] = r["bytes_per_round"]
        out[f"link/{r['name']}/results_lost"] = r["results_lost"]
        out[f"link/{r['name']}/duplicates"] = r["duplicates"]
    return out


def merge_profiles(out: Path, quick: bool = False) -> dict[str, Any]:
    """--profiles-only: run the link profiles and put them into the existing device_class(.quick).json,
    leaving its architecture rounds (and their provenance) as they are."""
    from bench.common import git_sha, machine

    started, load0 = time.time(), os.getloadavg()
    path = out / (f"{NAME}.quick.json" if quick else f"{NAME}.json")
    doc: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"benchmark": NAME, "raw": {}}
    profiles = run_profiles(quick)
    doc.setdefault("raw", {})["profiles"] = profiles
    doc.setdefault("params", {})["profiles"] = profile_params(quick)
    ratios = {k: v for k, v in doc.get("ratios", {}).items() if not k.startswith("link/")}
    doc["ratios"] = {**ratios, **profile_ratios(profiles)}
    notes = [n for n in doc.get("notes", []) if not n.startswith("profiles")]
    doc["notes"] = [*notes, *PROFILE_NOTES]
    doc["profiles_provenance"] = {  # the profiles were measured later than the rest of the file
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_sha": git_sha(),
        "command": f"koala bench {NAME} --profiles-only" + (" --quick" if quick else ""),
        "wall_s": round(time.time() - started, 2), "machine": {**machine(), "loadavg_start": list(load0)},
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    doc["path"] = str(path)
    doc.setdefault("machine", doc["profiles_provenance"]["machine"])
    return doc


if __name__ == "__main__":
    run(quick="--quick" in sys.argv, profiles_only="--profiles-only" in sys.argv, archs_only="--archs-only" in sys.argv)
