"""The demo launcher: broker + registry + server + N device processes + R real KOALA rounds.

`DemoRun` is also the end-to-end test harness (tests/e2e), so what the README's main command
runs is exactly what CI checks. Steps:
  1. write the fleet's files (proxy set, test set, one private Dirichlet partition per device);
  2. start the broker: a private Mosquitto (or amqtt) on a free loopback port, or use a URL;
  3. start the server in this process: ServerServices (registry migrations, MQTT, ingestion,
     orchestrator) inside the FastAPI app, served by uvicorn on a free loopback port;
  4. start every device agent as its own OS process (`koala-device run --config ...`);
  5. wait for the rounds, then build the result table and the accuracy plot.

Every run gets its own directory (`new_run_dir`: demo_runs/<timestamp>); a directory that holds
an earlier run is refused unless `resume=True`, which continues its registry for `policy.rounds`
more rounds and writes results/plot under fresh names, so nothing of an earlier run is overwritten.
The API's bearer token is generated per run (or KOALA_API__BEARER_TOKEN), written to
`<run dir>/api_token`; reads from this machine (loopback) need no token, mutations do.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_firmware_py.cli import CommandError
from server_app.policy import KoalaPolicy

log = logging.getLogger("koala.demo")
RUNS_DIR = "demo_runs"
EARLIER_RUN = ("koala.db", "results.json", "fleet.json", "server")  # any of these: the dir holds a run


def new_run_dir(base: str | Path = RUNS_DIR) -> Path:
    """A directory no earlier run used: base/<YYYYmmdd-HHMMSS>[-N]."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        p = Path(base) / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            p.mkdir(parents=True, exist_ok=False)
            return p
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory under {base}")


def holds_run(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in EARLIER_RUN)


def _fresh(path: Path) -> Path:
    """`path`, or `stem.2.suffix`, `stem.3.suffix`, ... : the first that does not exist yet."""
    n = 2
    out = path
    while out.exists():
        out = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return out


@dataclass(frozen=True)
class DemoApiSettings:
    """What server_app.api.auth reads from the services' settings: the token and the loopback switch."""

    api_token: str | None
    open_reads_localhost: bool = True


@dataclass
class DemoConfig:
    run_dir: str = "demo_run"  # `koala demo` passes new_run_dir() unless --run-dir/--resume
    dataset: str = "fashion-mnist"
    devices: int = 5
    alpha: float | None = 0.5
    proxy_size: int = 1000
    train_size: int | None = 10000
    test_size: int | None = 2000
    labeled_proxy: int = 0  # proxy rows whose labels the server knows (canary_filter); as koala sim's labeled_proxy
    broker: str = "embedded"  # embedded | mosquitto | amqtt | mqtt://host:port
    db: str | None = None  # default: SQLite in run_dir
    http_port: int = 0  # 0: a free port
    seed: int | None = None  # data partition seed; None: the policy's seed (as koala sim partitions)
    policy: KoalaPolicy = field(default_factory=KoalaPolicy)  # THE policy: rounds, archs, epochs, deadline...
    torch_threads: int = 2
    device_env: dict[str, str] = field(default_factory=dict)
    quiet_devices: bool = True
    resume: bool = False  # continue the run in run_dir (its registry) instead of refusing it
    api_token: str | None = None  # None: KOALA_API__BEARER_TOKEN, else a fresh random one per run
    open_reads_localhost: bool = True  # GETs from 127.0.0.1/::1 need no token (dashboard, curl)
    # > 0: the server split by role (docs/scale-out.md): this process orchestrates and N
    # `koala serve --role ingest` processes take the results off the shared subscription
    ingest_workers: int = 0


def _vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set (VmHWM) of a live process, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class DemoRun:
    """start() -> wait() -> results() -> stop(); or use as a context manager."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.broker: Any = None
        self.broker_url = ""
        self.services: Any = None
        self.server: Any = None
        self.http_port = 0
        self.agents: dict[str, subprocess.Popen] = {}
        self.workers: dict[str, subprocess.Popen] = {}  # `koala serve --role ingest` processes
        self.layout: Any = None
        self.t_start = 0.0
        self.rss_kib: dict[str, int | None] = {}
        saved = self.run_dir / "api_token"
        earlier = saved.read_text().strip() if cfg.resume and saved.is_file() else None  # a resumed run keeps it
        self.api_token = (cfg.api_token or os.environ.get("KOALA_API__BEARER_TOKEN") or earlier
                          or secrets.token_urlsafe(18))  # fmt: skip
        self.resumed_from_round = 0  # rounds the registry held at start (resume)
        self.results_path = self.run_dir / "results.json"
        self.server_log = self.run_dir / "server.log"  # the in-process server's log (INFO), appended to on resume
        self._log_handler: logging.Handler | None = None

    # ----------------------------------------------------------------- start
    def start(self) -> DemoRun:
        self.t_start = time.perf_counter()
        self.check_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token_file = self.run_dir / "api_token"
        token_file.write_text(self.api_token + "\n")
        token_file.chmod(0o600)
        self._attach_server_log()
        self._start_broker()
        self._write_fleet()
        self._start_server()
        from server_app.demo.run_file import write_run_file

        write_run_file(self.run_dir, api_url=f"http://127.0.0.1:{self.http_port}", broker_url=self.broker_url,
                       token_file=str(token_file), db_url=self.services.options.db_url, server_log=str(self.server_log),
                       dashboard=f"http://127.0.0.1:{self.http_port}/dashboard/")  # fmt: skip
        self._start_agents()
        return self

    def _attach_server_log(self) -> None:
        """Every record of this process (the server runs in it) at INFO and above -> <run dir>/server.log.
        What reaches the terminal is the caller's business (`koala demo` shows warnings only)."""
        h = logging.FileHandler(self.server_log, encoding="utf-8")
        h.setLevel(logging.INFO)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logging.getLogger().addHandler(h)
        self._log_handler = h

    def check_run_dir(self) -> None:
        """CommandError unless the run dir is new (or, with resume, holds an earlier run)."""
        if holds_run(self.run_dir) and not self.cfg.resume:
            raise CommandError(f"run dir {self.run_dir} holds an earlier run\n"
                               f"  continue it with --resume {self.run_dir}, or omit --run-dir for a fresh one")  # fmt: skip
        if self.cfg.resume and not holds_run(self.run_dir):
            raise CommandError(f"nothing to resume in {self.run_dir}: no earlier run there\n"
                               f"  give the directory of an earlier run (ls {RUNS_DIR}/), or omit --resume")  # fmt: skip

    def _start_broker(self) -> None:
        b = self.cfg.broker
        if b.startswith(("mqtt://", "tcp://")):
            self.broker_url = b
            return
        from server_app.transport.broker import make_embedded_broker

        prefer = "amqtt" if b == "amqtt" else "mosquitto"
        kw = {"workdir": self.run_dir / "broker"} if prefer == "mosquitto" else {}
        self.broker = make_embedded_broker(prefer, **kw).start()
        self.broker_url = self.broker.url
        log.info("broker started kind=%s url=%s", self.broker.name, self.broker_url)

    def _write_fleet(self) -> None:
        from server_app.demo.fleet_data import prepare_fleet

        c = self.cfg
        archs = list(c.policy.archs)  # round-robin, as koala sim assigns them
        self.layout = prepare_fleet(
            self.run_dir, dataset=c.dataset, devices=c.devices, alpha=c.alpha, proxy_size=c.proxy_size,
            train_size=c.train_size, test_size=c.test_size, archs=archs, seed=c.policy.seed if c.seed is None else c.seed, broker_url=self.broker_url,
            labeled_proxy=c.labeled_proxy,
        )  # fmt: skip

    def _start_server(self) -> None:
        import socket

        import uvicorn

        from server_app.api.app import create_app
        from server_app.services import ServerOptions, ServerServices

        c = self.cfg
        # bind first (port 0: the kernel picks a free one, no race with other processes), then hand
        # the socket to uvicorn
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", c.http_port))
        except OSError as exc:
            sock.close()
            raise CommandError(f"cannot listen on 127.0.0.1:{c.http_port}: {exc.strerror or exc}\n"
                               "  choose another --port, or 0 for a free one") from None  # fmt: skip
        self.http_port = sock.getsockname()[1]
        host, port = _host_port(self.broker_url)
        opts = ServerOptions(
            db_url=c.db or f"sqlite:///{self.run_dir / 'koala.db'}", data_dir=str(self.run_dir / "server"),
            proxy_path=self.layout.proxy_path, test_path=self.layout.test_path,
            proxy_labels_path=self.layout.proxy_labels_path, broker_host=host, broker_port=port,
            shared_subscriptions=None if self.broker is None else self.broker.features.shared_subscriptions,
            # the demo starts rounds once every agent is up (or, if one never comes, after a minute)
            policy=c.policy.with_overrides(min_devices=c.devices, min_devices_timeout_s=60.0),
            torch_threads=c.torch_threads, start_orchestrator=False,
            role="orchestrator" if c.ingest_workers else "all",
        )  # fmt: skip
        if c.ingest_workers and not (self.broker is not None and self.broker.features.shared_subscriptions):
            sock.close()
            raise CommandError("ingestion workers need a broker with shared subscriptions\n"
                               "  use the embedded Mosquitto (--broker embedded with mosquitto installed)")  # fmt: skip
        self.services = ServerServices(opts, settings=DemoApiSettings(self.api_token, c.open_reads_localhost))
        # started here, not by uvicorn's lifespan (start() is then a no-op): a failure (database,
        # broker) is the CommandError itself, not "server did not start"
        try:
            self.services.start()
        except BaseException:
            sock.close()
            raise
        try:
            self._start_workers(opts)
        except BaseException:
            sock.close()
            raise
        orch = self.services.orchestrator
        last = self.services.store.last_round()
        if last is not None:  # resume: the policy's rounds are rounds *more*
            from device_firmware_py.contract.messages import TERMINAL_ROUND_STATES

            self.resumed_from_round = last[0] + 1 if last[1] in TERMINAL_ROUND_STATES else last[0]
            orch.set_schedule_policy({"rounds": self.resumed_from_round + c.policy.rounds})
        orch.start()
        app = create_app(self.services)
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._server_thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                                               daemon=True)  # fmt: skip
        self._server_thread.start()
        t_end = time.monotonic() + 60
        while not (self.server.started and self.services.started):
            if not self._server_thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError("server did not start (see the log above)")
            time.sleep(0.05)
        log.info(
            "server up api=http://127.0.0.1:%d shared_subscriptions=%s", self.http_port, self.services.shared
        )

    def _start_workers(self, opts: Any) -> None:
        """`koala serve --role ingest --worker-id wN` processes on this run's registry, broker and
        data directory, configured as a deployment would (KOALA_* env); ready before any round."""
        import urllib.request

        from server_app.transport.broker import free_port

        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        ports = {}
        for i in range(1, self.cfg.ingest_workers + 1):
            wid, port = f"w{i}", free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("KOALA_")}
            env.update({"KOALA_DATABASE__URL": opts.db_url, "KOALA_BROKER__URL": self.broker_url,
                        "KOALA_BROKER__SHARED_GROUP": opts.share_group, "KOALA_PATHS__ARTIFACTS_DIR": opts.data_dir,
                        "KOALA_ROLE": "ingest", "KOALA_WORKER_ID": wid, "KOALA_LOG_LEVEL": "INFO",
                        "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})  # fmt: skip
            out = open(logs / f"ingest-{wid}.log", "ab")  # noqa: SIM115 - handed to the child process
            self.workers[wid] = subprocess.Popen([sys.executable, "-m", "server_app.cli", "serve", "--port", str(port)],
                                                 stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.run_dir)  # fmt: skip
            out.close()
            ports[wid] = port
        t_end = time.monotonic() + 60
        for wid, port in ports.items():
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                        break
                except OSError:
                    if self.workers[wid].poll() is not None or time.monotonic() > t_end:
                        raise RuntimeError(f"ingestion worker {wid} did not start: see {logs / f'ingest-{wid}.log'}") from None
                    time.sleep(0.2)
        if ports:
            log.info("ingestion workers ready workers=%s", ",".join(ports))

    def _start_agents(self) -> None:
        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **self.cfg.device_env}
        for d in self.layout.devices:
            self.start_agent(d["device_id"], env=env, log_path=logs / f"{d['device_id']}.log")

    def start_agent(
        self, device_id: str, env: dict[str, str] | None = None, log_path: Path | None = None
    ) -> subprocess.Popen:
        cfg_path = next(d["config_path"] for d in self.layout.devices if d["device_id"] == device_id)
        log_path = log_path or self.run_dir / "logs" / f"{device_id}.log"
        out = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
        p = subprocess.Popen([sys.executable, "-m", "device_firmware_py.cli", "run", "--config", cfg_path],
                             stdout=out, stderr=subprocess.STDOUT, env=env or {**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        out.close()
        self.agents[device_id] = p
        return p

    def stop_agent(self, device_id: str, sig: int = signal.SIGTERM) -> None:
        p = self.agents.get(device_id)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ------------------------------------------------------------------ wait
    def wait(self, timeout_s: float | None = None, progress: bool = True) -> bool:
        """Until the orchestrator ran every round; prints one line per round state change."""
        orch = self.services.orchestrator
        t_end = None if timeout_s is None else time.monotonic() + timeout_s
        seen: dict[int, str] = {}
        while orch.alive and orch.state != "finished":
            if t_end is not None and time.monotonic() > t_end:
                return False
            if progress:
                self._progress_line(seen)
            for dev, p in self.agents.items():
                if p.poll() is not None and p.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                    log.warning("agent exited device=%s code=%s", dev, p.returncode)
            time.sleep(0.5)
        if progress:
            self._progress_line(seen)
        self.rss_kib = {"server": _vm_hwm_kib(os.getpid())}
        self.rss_kib.update({dev: _vm_hwm_kib(p.pid) for dev, p in self.agents.items() if p.poll() is None})
        return orch.state == "finished"

    def _progress_line(self, seen: dict[int, str]) -> None:
        from server_app.registry import crud

        rows = self.services.registry.run(crud.list_rounds, limit=3)
        for r in sorted(rows, key=lambda r: r.id):
            counts = self.services.registry.run(crud.round_counts, r.id)
            key = f"{r.state}:{counts['received']}:{counts['accepted']}"
            if seen.get(r.id) == key:
                continue
            seen[r.id] = key
            acc = (r.metrics or {}).get("large_test_acc")
            print(f"round {r.id:>3}  {r.state:<11} participants={len(r.participants or []):>3} "
                  f"received={counts['received']:>3} accepted={counts['accepted']:>3}"
                  + (f"  large_acc={acc:.4f}" if isinstance(acc, float) else "")
                  + (f"  error={r.error}" if r.error else ""), flush=True)  # fmt: skip

    # --------------------------------------------------------------- results
    def results(self) -> dict[str, Any]:
        """Per-round table (from the orchestrator's reports) + totals, written to results.json."""
        rows = []
        for rep in self.services.orchestrator.reports:
            m = rep.metrics
            small = [
                dm.get("test_acc")
                for dm in rep.device_metrics.values()
                if isinstance(dm.get("test_acc"), float)
            ]
            rows.append({
                "round": rep.round_id, "large_test_acc": m.get("large_test_acc"),
                "small_test_acc_mean": sum(small) / len(small) if small else None,
                "accepted": m.get("accepted"), "participants": m.get("participants"),
                "bytes_assign_msg": m.get("bytes_assign_msg"), "bytes_result_msg": m.get("bytes_result_msg"),
                "bytes_down_total": m.get("bytes_down_total"), "bytes_up_total": m.get("bytes_up_total"),
                "t_device_compute_s": m.get("t_device_compute_max_s"), "t_transfer_s": m.get("t_transfer_mean_s"),
                "t_collect_s": m.get("t_collect_s"), "t_server_kd_s": m.get("t_aggregate_s"),
                "t_configure_s": m.get("t_configure_s"), "t_round_s": m.get("t_round_wall_s"),
            })  # fmt: skip
        out = {
            "config": {**{k: v for k, v in self.cfg.__dict__.items() if k != "policy"},
                       "policy": self.cfg.policy.model_dump(mode="json")},
            "broker": getattr(self.broker, "name", self.broker_url), "shared_subscriptions": self.services.shared,
            "api": f"http://127.0.0.1:{self.http_port}", "rounds": rows,
            "peak_rss_kib": self.rss_kib, "wall_s": time.perf_counter() - self.t_start,
        }  # fmt: skip
        out["resumed_from_round"] = self.resumed_from_round
        self.results_path = _fresh(self.run_dir / "results.json")  # a resumed run keeps the earlier ones
        self.results_path.write_text(json.dumps(out, indent=1, default=str))
        return out

    def plot(self, results: dict[str, Any]) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = results["rounds"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            [r["round"] for r in rows],
            [r["large_test_acc"] for r in rows],
            "o-",
            label="large model (server)",
        )
        xs = [r["round"] for r in rows if r["small_test_acc_mean"] is not None]
        ax.plot(xs, [r["small_test_acc_mean"] for r in rows if r["small_test_acc_mean"] is not None], "s--",
                label="small models (mean, on device)")  # fmt: skip
        ax.set_xticks([r["round"] for r in rows])
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"KOALA over MQTT: {self.cfg.dataset}, {self.cfg.devices} devices, {self.cfg.policy.strategy}")
        ax.grid(alpha=0.3)
        ax.legend()
        path = _fresh(self.run_dir / "accuracy.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def models_guide(self, live: bool = False) -> str:
        """Where each trained model is and how to use it (printed at the end of `koala demo`). `live`:
        the server keeps running (--keep-serving), so the API commands work; else only offline ones."""
        from server_app.models import export as mx

        md = self.run_dir / "server" / "models"
        base = f"http://127.0.0.1:{self.http_port}"
        tok = self.run_dir / "api_token"
        data = f"--data-dir {self.run_dir / 'server'}"
        rows = [r for r in (mx.list_versions(md) if md.is_dir() else []) if r.get("export")]
        lines = ["Your models (docs/models.md, docs/device-serving.md):"]
        if rows:
            last = rows[-1]
            lines += [f"  large model v{last['version']} (round {last.get('round')}): {last['export']}",
                      "    model.safetensors + model.json (card); model.pt, model.torchscript.pt, model.onnx are built on demand"]
            if live:
                lines += [f"    koala models ls --run-dir {self.run_dir}",
                          f"    koala models export latest --format all --out my_model/ --run-dir {self.run_dir}",
                          f"    koala models small --format float int8 --out my_model/ --run-dir {self.run_dir}",
                          f"    curl -s -H \"Authorization: Bearer $(cat {tok})\" -H 'Content-Type: application/x-npy' "
                          f"--data-binary @images.npy {base}/api/v1/predict"]  # fmt: skip
            else:  # the server stops with the demo: the commands that read its data directory
                lines += [f"    koala models ls {data}",
                          f"    koala models export latest {data} --format all --out my_model/",
                          f"    koala models small {data} --format float int8 --out my_model/",
                          "    (no server needed; with --keep-serving the demo's API also answers /api/v1/predict)"]  # fmt: skip
        else:
            lines.append(f"  large model: none exported yet (its versions appear in {md / 'export'} after each round)")
        lines.append("  small models, one per device (int8 LiteRT, re-quantized after each round; each agent serves its own on "
                     "its endpoint while it runs: --keep-serving keeps them up):")
        for d in getattr(self.layout, "devices", []) if self.layout is not None else []:
            try:
                state = Path(json.loads(Path(d["config_path"]).read_text())["state_dir"])
            except (OSError, ValueError, KeyError):
                continue
            int8 = state / "model_int8.tflite"
            lines.append(f"    {d['device_id']} ({d['arch']}): {int8 if int8.is_file() else '(no int8 model yet)'}   "
                         f"endpoint unix:{state / 'agent.sock'}")  # fmt: skip
        if getattr(self.layout, "devices", None):
            cfg0 = self.layout.devices[0]["config_path"]
            lines += [f"    koala-device predict --config {cfg0} images.npy     (asks the running agent; "
                      "--model FILE.tflite runs a file without one)",
                      "    curl --unix-socket <endpoint> -H 'Content-Type: application/x-npy' --data-binary @images.npy "
                      "http://localhost/v1/predict",
                      "  edge-cloud cascade (opt-in per device, sends unsure inputs to the server): set cascade = true "
                      "in a device config (docs/device-serving.md)"]  # fmt: skip
        return "\n".join(lines)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        _terminate(self.agents.values(), 15)
        _terminate(self.workers.values(), 30)  # after the agents, before the orchestrator: they drain what they hold
        if self.server is not None:
            self.server.should_exit = True
            self._server_thread.join(30)
            self.server = None
        if self.services is not None and self.services.started:  # started, but uvicorn never ran its lifespan
            self.services.stop()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        from server_app.demo.run_file import mark_stopped

        mark_stopped(self.run_dir)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def __enter__(self) -> DemoRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(procs: Any, wait_s: float) -> None:
    """SIGTERM every live process, then wait for each (SIGKILL after wait_s)."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _host_port(url: str) -> tuple[str, int]:
    from device_firmware_py.mqtt import parse_broker_url

    a = parse_broker_url(url)
    return a.host, a.port


def format_table(results: dict[str, Any]) -> str:
    """The result table printed at the end of `koala demo`."""
    head = (f"{'round':>5} {'large acc':>9} {'small acc':>9} {'ok':>4} {'assign B':>9} {'result B':>9} "
            f"{'down kB':>8} {'up kB':>8} {'device s':>8} {'xfer s':>7} {'KD s':>6} {'round s':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in results["rounds"]:
        lines.append(
            f"{r['round']:>5} {f(r['large_test_acc'], '9.4f')} {f(r['small_test_acc_mean'], '9.4f')} "
            f"{f(r['accepted'], '4d')} {f(r['bytes_assign_msg'], '9.0f')} {f(r['bytes_result_msg'], '9.0f')} "
            f"{f((r['bytes_down_total'] or 0) / 1e3, '8.1f')} {f((r['bytes_up_total'] or 0) / 1e3, '8.1f')} "
            f"{f(r['t_device_compute_s'], '8.2f')} {f(r['t_transfer_s'], '7.3f')} {f(r['t_server_kd_s'], '6.2f')} "
            f"{f(r['t_round_s'], '7.2f')}"
        )
    return "\n".join(lines)
