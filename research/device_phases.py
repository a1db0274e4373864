"""Where a device round's memory goes: VmRSS / VmHWM of one agent round, phase by phase.

A diagnostic next to `koala bench device_class` (which measures the agent as its own process under a
cgroup, but only its peak). This runs the real DeviceAgent in THIS process -- setup(), then the
round's _execute() with a stand-in for the MQTT client -- and prints the resident and peak memory
after setup, after each SmallModel phase (distill, train, logits, park, ...), around the int8
re-quantization, and optionally the largest mappings (/proc/self/smaps) at the distill peak. The
data files are written by a child process so their arrays do not count here. No broker, no cgroup;
the numbers include this script's own imports (compare with the "numpy" line, not with
device_class's separate baseline process).

    python -m research.device_phases mobilenet_tiny --proxy 1000
    python -m research.device_phases mobilenet_tiny --set low_memory=false --set release_before_quantize=false
    python -m research.device_phases mobilenet_tiny --set xnnpack=false --rounds 2 --smaps
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T0 = time.monotonic()


def _status() -> dict[str, float]:
    out = {}
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith(("VmRSS:", "VmHWM:")):
            out[ln.split(":")[0]] = int(ln.split()[1]) / 1024
    return out


def report(tag: str) -> None:
    s = _status()
    print(f"{time.monotonic() - T0:6.1f}s  {tag:30s} RSS {s['VmRSS']:7.1f}  HWM {s['VmHWM']:7.1f} MiB", flush=True)


def smaps_top(tag: str, n: int = 12) -> None:
    cur, agg = "[anon]", collections.Counter()
    for ln in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", ln):
            parts = ln.split()
            cur = Path(parts[5]).name if len(parts) > 5 and parts[5].startswith("/") else (parts[5] if len(parts) > 5 else "[anon]")
        elif ln.startswith("Rss:"):
            agg[cur] += int(ln.split()[1])
    print(f"  -- {tag}: largest mappings (RSS MiB)")
    for name, kib in agg.most_common(n):
        print(f"     {kib / 1024:6.1f}  {name}")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.device_phases", description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=["mlp_tiny", "cnn_small", "mobilenet_tiny"])
    p.add_argument("--proxy", type=int, default=1000)
    p.add_argument("--private", type=int, default=600)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="device config over bench.device_class.CLASS_CONFIG (JSON values: true, false, 64)")
    p.add_argument("--smaps", action="store_true", help="largest mappings after setup and at the end of forward KD")
    args = p.parse_args(argv)

    import numpy as np

    report("numpy")
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from bench.device_class import CLASS_CONFIG
    from device_firmware_py.agent.agent import DeviceAgent
    from device_firmware_py.config import DeviceConfig
    from device_firmware_py.contract import messages as cm
    from device_firmware_py.contract.plan import TrainingPlan

    report("agent imports")
    cfg = {**CLASS_CONFIG, **{k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}}
    work = Path(tempfile.mkdtemp(prefix="koala-device-phases-"))
    code = ("import sys, json; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from bench.device_class import write_device; "
            "write_device(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), 'mqtt://127.0.0.1:1', "
            "**json.loads(sys.argv[6]))")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(repo), str(work), args.arch, str(args.proxy), str(args.private),
                    json.dumps(cfg)], check=True)  # fmt: skip
    conf = DeviceConfig.load(work / "config.json")
    print(f"device config: { {k: getattr(conf, k) for k in sorted(cfg)} }")

    class NoBroker:
        def publish(self, *a: Any, **k: Any) -> None:
            pass

    agent = DeviceAgent(conf)
    agent._client = NoBroker()
    agent.setup()
    report("setup")
    if args.smaps:
        smaps_top("after setup")
    model = agent.model
    first_distill = [True]

    def traced(obj: Any, name: str, before: bool = False) -> None:
        fn = getattr(obj, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            if before:
                report(f"before {name}")
            out = fn(*a, **k)
            report(name)
            return out

        setattr(obj, name, wrapper)

    for name in ("distill", "train", "logits", "evaluate"):
        traced(model, name)
    for name in ("_requantize",):
        traced(agent, name, before=True)
    park = model.park

    def park_traced() -> None:
        if args.smaps and first_distill[0] and "distill" in model._used:
            first_distill[0] = False
            smaps_top("end of forward KD, interpreter still open")
        park()

    model.park = park_traced
    teacher = np.random.default_rng(1).normal(size=(args.proxy, 10)).astype(np.float32)
    for r in range(args.rounds):
        plan = TrainingPlan(upload=("logits",), local_epochs=5, fkd_epochs=1, seed=r)
        agent._execute(cm.Assignment(r, conf.device_id, args.arch, plan=plan, teacher_logits=teacher,
                                     proxy_digest=conf.proxy_sha256, deadline=time.time() + 120))  # fmt: skip
        report(f"round {r} done")
    w = model.get_weights()
    print(f"weights |w| sum {sum(float(np.abs(a).astype(np.float64).sum()) for a in w):.6f}; int8 {agent.int8_info}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
