"""Device footprint: memory, install size, cold start, on-device training speed, int8 vs float.

Baselines measured in the same run:
  peak RSS / cold start   vs a bare `python -c "import numpy"` process (what any Python device pays)
  install size            device extra's dependency closure vs the server extra's (same venv metadata);
                          full mode also builds a fresh venv with `pip install .[device]` and measures it
  train step              LiteRT `train` signature vs the same network (bench.torch_nets) in PyTorch
                          CPU, both single-threaded, batch 32, Adam
  inference               int8 model vs float inference model: size and latency (batch 1 and 256)

Role `python -m bench.device_footprint worker ARCH SHAPE` is the device process: imports only
device_firmware_py (+paho), loads the artifact, infers once, runs one round of the device algorithm
(device_firmware_py.task.execute_assignment: forward KD, local training, proxy logits) and the int8
re-quantization, then prints its timings and VmHWM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.slim_install import tree_bytes

NAME = "device_footprint"
ARCHS = ("mlp_tiny", "cnn_small", "mobilenet_tiny")


# ------------------------------------------------------------------------------- device process
def worker(arch: str, shape: str, proxy: int, private: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    import paho.mqtt.client  # noqa: F401  (the agent's transport, part of its footprint)

    from device_firmware_py.contract.plan import TrainingPlan
    from device_firmware_py.runtime.small_model import SmallModel
    from device_firmware_py.task import Assignment, execute_assignment

    t_import = time.perf_counter() - t0
    m = SmallModel(f"{arch}_{shape}", num_threads=2)
    t_load = time.perf_counter() - t0 - t_import
    rng = np.random.default_rng(0)
    h, w, c = m.input_shape
    x1 = rng.random((1, h, w, c), dtype=np.float32)
    m.logits(x1)
    t_cold = time.perf_counter() - t0
    rss_cold = _hwm()
    xp = rng.random((private, h, w, c), dtype=np.float32)
    yp = rng.integers(0, m.num_classes, private)
    px = rng.random((proxy, h, w, c), dtype=np.float32)
    teacher = rng.standard_normal((proxy, m.num_classes)).astype(np.float32)
    t1 = time.perf_counter()
    a = Assignment(round_id=1, device_id="dev-00001", arch=arch, plan=TrainingPlan(task="koala", upload=("logits",)),
                   teacher_logits=teacher)  # fmt: skip
    execute_assignment(m, xp, yp, px, a)
    t_round = time.perf_counter() - t1
    t2 = time.perf_counter()
    int8 = m.quantize_int8(px)
    t_quant = time.perf_counter() - t2
    return {"arch": arch, "shape": shape, "t_import_s": t_import, "t_load_s": t_load, "t_cold_start_s": t_cold,
            "rss_after_cold_start_mib": rss_cold, "t_round_s": t_round, "t_int8_quantize_s": t_quant,
            "int8_bytes": len(int8), "peak_rss_mib": _hwm(), "proxy": proxy, "private": private,
            "modules_torch": "torch" in sys.modules, "modules_tensorflow": "tensorflow" in sys.modules}  # fmt: skip


def _hwm() -> float | None:
    from pathlib import Path as _P

    for line in _P("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def _spawn(args: list[str]) -> tuple[dict[str, Any], float]:
    from bench.common import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{args}: rc={out.returncode} {out.stderr[-1500:]}")
    return json.loads(lines[-1]), wall


# ------------------------------------------------------------------------------ install sizes
def _dist_size(dist: Any) -> int:
    total = 0
    for f in dist.files or []:
        with contextlib.suppress(OSError):
            total += (dist.locate_file(f)).stat().st_size
    return total


def closure_size(root: str, extra: str) -> dict[str, Any]:
    """Installed bytes of `root[extra]` and its dependency closure, from this venv's metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict[str, int] = {}
    todo = [(root, {extra})]
    while todo:
        name, extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if key not in seen:
            seen[key] = _dist_size(dist) if key != "koala-edge" else 0
        for req_s in dist.requires or []:
            req = Requirement(req_s)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue  # an extra we did not ask for, or another platform
            rkey = re.sub(r"[-_.]+", "-", req.name).lower()
            if rkey == "koala-edge" or rkey not in seen:
                todo.append((req.name, set(req.extras)))
    return {"bytes": sum(seen.values()), "packages": len(seen), "largest": sorted(seen.items(), key=lambda kv: -kv[1])[:5]}


def fresh_venv_size() -> dict[str, Any]:
    """`pip install .[device]` into a fresh venv; installed size minus the empty venv's."""
    import venv

    from bench.common import CHECKOUT, CHECKOUT_HINT, REPO

    if not CHECKOUT:
        return {"error": f"skipped: `pip install .[device]` needs a source checkout ({CHECKOUT_HINT})"}
    with tempfile.TemporaryDirectory(prefix="koala-bench-devvenv-") as tmp:
        env_dir = Path(tmp) / "venv"
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        empty = tree_bytes(env_dir)
        t0 = time.perf_counter()
        res = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", f"{REPO}[device]"],
                             capture_output=True, text=True, timeout=600, cwd=tmp)  # fmt: skip
        t_install = time.perf_counter() - t0
        if res.returncode != 0:
            return {"error": res.stderr[-1000:]}
        return {"installed_bytes": tree_bytes(env_dir) - empty, "venv_bytes": tree_bytes(env_dir), "t_install_s": t_install}


# --------------------------------------------------------------------------------- train steps
def train_steps(arch: str, shape: str, steps: int) -> dict[str, Any]:
    import torch

    from bench.torch_nets import build_twin, train_step_fn
    from device_firmware_py.runtime.small_model import SmallModel

    m = SmallModel(f"{arch}_{shape}", num_threads=1)
    h, w, c = m.input_shape
    b = m.manifest.train_batch
    rng = np.random.default_rng(0)
    x = rng.random((b * steps, h, w, c), dtype=np.float32)
    y = rng.integers(0, m.num_classes, len(x))
    m.train(x[: b * 3], y[: b * 3], steps=3)  # warm-up (XNNPACK packing, allocation)
    t0 = time.perf_counter()
    m.train(x, y, steps=steps)
    litert = (time.perf_counter() - t0) / steps
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = build_twin(m.manifest.raw)
        step = train_step_fn(net)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        for i in range(3):
            step(xt[i * b : (i + 1) * b], yt[i * b : (i + 1) * b])
        t0 = time.perf_counter()
        for i in range(steps):
            step(xt[i * b : (i + 1) * b], yt[i * b : (i + 1) * b])
        torch_s = (time.perf_counter() - t0) / steps
    finally:
        torch.set_num_threads(prev)
    return {"arch": arch, "shape": shape, "params": m.manifest.raw["param_count"], "batch": b, "steps": steps,
            "litert_ms_per_step": litert * 1e3, "torch_ms_per_step": torch_s * 1e3, "litert_over_torch": litert / torch_s}  # fmt: skip


def inference(arch: str, shape: str, reps: int) -> dict[str, Any]:
    from device_firmware_py.runtime.quantize import TFLiteLogits
    from device_firmware_py.runtime.small_model import SmallModel

    m = SmallModel(f"{arch}_{shape}", num_threads=1)
    h, w, c = m.input_shape
    x = np.random.default_rng(0).random((256, h, w, c), dtype=np.float32)
    fl = m.float_inference_model()
    q = m.quantize_int8(x)
    out: dict[str, Any] = {"arch": arch, "shape": shape, "float_bytes": len(fl), "int8_bytes": len(q)}
    for label, model in (("float", fl), ("int8", q)):
        one = TFLiteLogits(model, num_threads=1, batch=1)
        one(x[:1])
        t0 = time.perf_counter()
        for i in range(reps):
            one(x[i % 256 : i % 256 + 1])
        out[f"{label}_ms_batch1"] = (time.perf_counter() - t0) / reps * 1e3
        big = TFLiteLogits(model, num_threads=1, batch=256)
        big(x)
        t0 = time.perf_counter()
        for _ in range(max(1, reps // 50)):
            big(x)
        out[f"{label}_us_per_sample_batch256"] = (time.perf_counter() - t0) / (max(1, reps // 50) * 256) * 1e6
    out["int8_size_ratio"] = out["int8_bytes"] / out["float_bytes"]
    out["int8_latency_ratio_batch1"] = out["int8_ms_batch1"] / out["float_ms_batch1"]
    out["int8_latency_ratio_batch256"] = out["int8_us_per_sample_batch256"] / out["float_us_per_sample_batch256"]
    return out


# ---------------------------------------------------------------------------------------- run
def run(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    from bench.common import DEFAULT_OUT, ratio, table, write_result

    started, load0 = time.time(), os.getloadavg()
    out = out or DEFAULT_OUT
    shape = "28x28x1"
    archs = ("cnn_small",) if quick else ARCHS
    proxy, private = (200, 128) if quick else (5000, 600)
    base, base_wall = _spawn(["-c", "import json,numpy;from pathlib import Path;"
                              "print(json.dumps({'peak_rss_mib':[int(l.split()[1])/1024 for l in "
                              "Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0]}))"])  # fmt: skip
    procs = []
    for a in archs:
        rep, wall = _spawn(["-m", "bench.device_footprint", "worker", a, shape, str(proxy), str(private)])
        rep["process_wall_s"] = wall
        rep["rss_over_python_numpy"] = ratio(rep["peak_rss_mib"], base["peak_rss_mib"])
        procs.append(rep)
    sizes = {"device_extra": closure_size("koala-edge", "device"), "server_extra": closure_size("koala-edge", "server")}
    sizes["device_over_server"] = ratio(sizes["device_extra"]["bytes"], sizes["server_extra"]["bytes"])
    if not quick:
        sizes["fresh_venv_device"] = fresh_venv_size()
    steps = [train_steps(a, s, 10 if quick else 100) for a in archs for s in ((shape,) if quick else (shape, "32x32x3"))]
    infer = [inference(a, shape, 50 if quick else 1000) for a in archs]

    print(table(["arch", "import s", "load s", "cold start s (import+load+1st infer)", "round s", "int8 quantize s",
                 "peak RSS MiB", "vs python+numpy"],
                [[p["arch"], p["t_import_s"], p["t_load_s"], p["t_cold_start_s"], p["t_round_s"], p["t_int8_quantize_s"],
                  p["peak_rss_mib"], p["rss_over_python_numpy"]] for p in procs]))  # fmt: skip
    print(f"\nbaseline python+numpy peak RSS {base['peak_rss_mib']:.1f} MiB, process wall {base_wall:.2f} s")
    fv = sizes.get("fresh_venv_device", {})
    print(table(["install", "MB", "packages"],
                [["device extra closure (venv metadata)", sizes["device_extra"]["bytes"] / 1e6, sizes["device_extra"]["packages"]],
                 ["server extra closure (venv metadata)", sizes["server_extra"]["bytes"] / 1e6, sizes["server_extra"]["packages"]],
                 ["fresh venv pip install .[device]", (fv.get("installed_bytes") or 0) / 1e6 if fv else None, None]]))  # fmt: skip
    print()
    print(table(["arch", "input", "params", "LiteRT ms/step", "torch ms/step", "LiteRT/torch"],
                [[s["arch"], s["shape"], s["params"], s["litert_ms_per_step"], s["torch_ms_per_step"], s["litert_over_torch"]]
                 for s in steps]))  # fmt: skip
    print()
    print(table(["arch", "float B", "int8 B", "size ratio", "float ms b1", "int8 ms b1", "float us/sample b256",
                 "int8 us/sample b256", "int8/float b1", "int8/float b256"],
                [[i["arch"], i["float_bytes"], i["int8_bytes"], i["int8_size_ratio"], i["float_ms_batch1"], i["int8_ms_batch1"],
                  i["float_us_per_sample_batch256"], i["int8_us_per_sample_batch256"], i["int8_latency_ratio_batch1"],
                  i["int8_latency_ratio_batch256"]] for i in infer]))  # fmt: skip
    ratios: dict[str, Any] = {"install/device_over_server": sizes["device_over_server"]}
    ratios.update({f"rss/{p['arch']}/over_python_numpy": p["rss_over_python_numpy"] for p in procs})
    ratios.update({f"train/{s['arch']}_{s['shape']}/litert_over_torch": s["litert_over_torch"] for s in steps})
    ratios.update({f"int8/{i['arch']}/size": i["int8_size_ratio"] for i in infer})
    ratios.update({f"int8/{i['arch']}/latency_b1": i["int8_latency_ratio_batch1"] for i in infer})
    return write_result(NAME, out, quick=quick, params={"archs": archs, "shape": shape, "proxy": proxy, "private": private,
                        "threads": {"device_process": 2, "train_step": 1, "inference": 1}},
                        raw={"baseline_python_numpy": {**base, "process_wall_s": base_wall}, "device_process": procs,
                             "install": sizes, "train_steps": steps, "inference": infer}, ratios=ratios,
                        notes=["device process = the agent's algorithm (execute_assignment) without MQTT; "
                               "paho is imported so its footprint counts"],
                        started=started, load_start=load0)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        a = sys.argv[2:]
        print(json.dumps(worker(a[0], a[1], int(a[2]), int(a[3]))))
    else:
        run(quick="--quick" in sys.argv)
