"""`koala demo`: broker + registry + server + N device processes + R real KOALA rounds, one command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports the server lazily (--help stays fast)
    from server_app.demo.launcher import DemoConfig
    from server_app.policy import KoalaPolicy

HELP = "run a whole KOALA deployment locally: embedded broker, server, N device agent processes, R rounds"

# Data layout per data set where the flags leave it unset. Digits has 1,797 images in all: a
# 300-image proxy set (the training policy is the same KoalaPolicy everywhere: --policy FILE).
PROXY_SIZE = {"digits": 300, None: 1000}
# policy fields set by a flag of another name (an error names the flag the user typed)
DEMO_FLAGS = {"deadline_s": "--round-timeout"}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=5, help="device agent processes (default 5)")
    p.add_argument("--policy", help="KOALA policy file (.toml/.yaml/.json: the [policy] of koala serve, or its "
                   "fields at the top level); flags below override it. Default: the measured best policy")
    p.add_argument("--rounds", type=int, default=None, help="KOALA rounds (default 5)")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) | digits (fast) | mnist | cifar10")
    p.add_argument("--mode", choices=("homo", "hetero"), default=None,
                   help="homo: cnn_small on every device (koala_homo); hetero: mlp_tiny, cnn_small, mobilenet_micro "
                        "round-robin (koala_hetero)")
    p.add_argument("--broker", default="embedded", help="embedded (private Mosquitto, else amqtt) | amqtt | mqtt://host:port")
    p.add_argument("--database-url", "--db", dest="db",
                   help="database URL (default: SQLite in the run dir), e.g. postgresql://postgres@127.0.0.1/koala")
    p.add_argument("--run-dir", help="where data partitions, DB, logs, results go (default: a fresh "
                   "demo_runs/<timestamp> per run; a directory holding an earlier run needs --resume)")
    p.add_argument("--resume", metavar="DIR", help="continue the earlier run in DIR (its registry, model and "
                   "devices) for --rounds more rounds; its results and plot are kept (new ones get a .2, .3 ... name)")
    p.add_argument("--token", help="API bearer token (default: KOALA_API__BEARER_TOKEN, else a random one per "
                   "run, printed and saved as <run dir>/api_token); reads from this machine need none")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the label skew (<=0: IID)")
    p.add_argument("--proxy-size", type=int, default=None, help="proxy images (default 1000; digits 300)")
    p.add_argument("--labeled-proxy", type=int, default=0,
                   help="proxy rows whose labels the server knows, to judge devices by (policy canary_filter; 0: none)")
    p.add_argument("--train-size", type=int, default=6000, help="device training samples in total (0: all)")
    p.add_argument("--test-size", type=int, default=2000, help="server test samples (0: all)")
    p.add_argument("--local-epochs", type=int, default=None, help="policy local_epochs (device epochs per round)")
    p.add_argument("--rkd-epochs", type=int, default=None, help="policy rkd_epochs (reverse-KD epochs on the server)")
    p.add_argument("--round-timeout", type=float, default=None, help="policy deadline_s (default 300 in the demo)")
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    p.add_argument("--seed", type=int, default=None, help="policy seed (training and the data partition; default 0)")
    p.add_argument("--keep-serving", action="store_true", help="keep server, broker and devices up after the rounds")
    p.add_argument("--torch-threads", type=int, default=2, metavar="N",
                   help="torch threads of the server's large model (default 2); the README's tables ran with 1: the "
                   "count changes float summation order, so a run is reproduced exactly only with the same count")
    p.add_argument("--ingest-workers", type=int, default=0, metavar="N",
                   help="split the server (docs/scale-out.md): this process orchestrates, N `koala serve --role ingest` "
                   "processes take the results (default 0: one process does everything)")


def run(args: argparse.Namespace) -> int:
    import logging
    import time

    from device_firmware_py.cli import CommandError
    from server_app.commands import stop_on_signals
    from server_app.data.datasets import DATASETS
    from server_app.demo.launcher import DemoRun, format_table

    if args.devices < 1:  # before anything starts (a broker, a run dir)
        print(f"koala demo: --devices {args.devices}: must be >= 1 (device agent processes to start)", file=sys.stderr)
        return 2
    from server_app.policy import PolicyError

    try:
        policy = demo_policy(args)
    except (ValueError, PolicyError) as exc:
        print(f"koala demo: {exc}", file=sys.stderr)
        return 2
    if args.dataset not in DATASETS:
        raise CommandError(f"unknown dataset {args.dataset!r}\n  use one of: {', '.join(DATASETS)} (--dataset)")
    if args.resume and args.run_dir and Path(args.resume).resolve() != Path(args.run_dir).resolve():
        raise CommandError(f"--resume {args.resume} and --run-dir {args.run_dir} name different directories\n"
                           "  give one of them (--resume DIR is the run dir)")  # fmt: skip
    if args.torch_threads < 1:
        raise CommandError(f"--torch-threads {args.torch_threads}: needs at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # the terminal shows warnings and the demo's own lines; <run dir>/server.log gets the server's INFO too
    for h in logging.getLogger().handlers:
        h.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("koala.demo"))
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    cfg = demo_config(args, policy)
    demo = DemoRun(cfg)
    demo.check_run_dir()
    print(f"run dir {demo.run_dir}" + ("  (resumed)" if cfg.resume else ""))
    print(f"KOALA demo: {cfg.devices} device processes, {policy.rounds} rounds of {policy.strategy} on {cfg.dataset} "
          f"(policy: {', '.join(f'{k}={getattr(policy, k)}' for k in sorted(policy.explicit())) or 'defaults'})")
    try:
        stop_on_signals("koala demo")  # Ctrl-C / SIGTERM stop the broker, server and agents it started
        try:
            demo.start()
        except FileNotFoundError as exc:  # a data set that is not installed
            raise CommandError(f"data set {cfg.dataset}: {exc}\n  install it (scripts/setup.sh as root: apt-get "
                               "install dataset-fashion-mnist) or run with --dataset digits") from None  # fmt: skip
        base = f"http://127.0.0.1:{demo.http_port}"
        print(f"broker {demo.broker_url}   API {base}/docs   run dir {demo.run_dir}"
              + (f"   resuming after round {demo.resumed_from_round - 1}" if demo.resumed_from_round else ""))
        print(f"dashboard {base}/dashboard/#token={demo.api_token}\n"
              f"  reads from this machine need no token; start/stop rounds and other changes need "
              f"Authorization: Bearer {demo.api_token}  (saved in {demo.run_dir / 'api_token'})\n"
              f"other shells: koala rounds ls --run-dir {demo.run_dir}   koala monitor --run-dir {demo.run_dir}"
              f"   (both read {demo.run_dir / 'run.json'})   server log {demo.server_log}", flush=True)  # fmt: skip
        ok = demo.wait()
        res = demo.results()
        print()
        print(format_table(res))
        png = demo.plot(res)
        rss = res["peak_rss_kib"]
        agents = [v for k, v in rss.items() if k != "server" and v]
        print(f"\npeak RSS: server {rss.get('server', 0) / 1024:.0f} MiB, device agent "
              f"{(max(agents) if agents else 0) / 1024:.0f} MiB (max of {len(agents)})")  # fmt: skip
        print(f"results {demo.results_path}" + (f"   plot {png}" if png else "") + f"   server log {demo.server_log}")
        print()
        print(demo.models_guide(live=args.keep_serving))
        print()
        if args.keep_serving:
            print(f"dashboard {base}/dashboard/#token={demo.api_token}   API {base}/docs\n"
                  f"  koala rounds ls --run-dir {demo.run_dir}   koala monitor --run-dir {demo.run_dir}\n"
                  "--keep-serving: server, broker and agents stay up until Ctrl-C", flush=True)  # fmt: skip
            while True:
                time.sleep(3600)
        demo.stop()  # before saying so
        print(f"the demo has stopped (server, broker, agents): {base} no longer answers. Everything is in "
              f"{demo.run_dir}: results.json, server.log, logs/, server/models (koala models ls --data-dir "
              f"{demo.run_dir / 'server'}); `koala demo --keep-serving` keeps a demo up until Ctrl-C")  # fmt: skip
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 130
    finally:
        demo.stop()


def demo_config(args: argparse.Namespace, policy: KoalaPolicy) -> DemoConfig:
    """The DemoConfig the flags describe (run dir: --resume, else --run-dir, else a fresh one)."""
    from server_app.demo.launcher import DemoConfig, new_run_dir

    run_dir = args.resume or args.run_dir or str(new_run_dir())
    return DemoConfig(
        run_dir=run_dir, resume=bool(args.resume), api_token=args.token, dataset=args.dataset, devices=args.devices,
        alpha=args.alpha if args.alpha > 0 else None,
        proxy_size=args.proxy_size or PROXY_SIZE.get(args.dataset, PROXY_SIZE[None]),
        train_size=args.train_size or None, test_size=args.test_size or None, broker=args.broker, db=args.db,
        http_port=args.port, policy=policy, labeled_proxy=args.labeled_proxy, ingest_workers=max(0, args.ingest_workers),
        torch_threads=args.torch_threads,
    )  # fmt: skip


def demo_policy(args: argparse.Namespace):
    """The policy file (--policy, else the data set's bundled one in server_app/policies/, else the
    defaults) + the flags; the demo's own defaults: 5 rounds, a 300 s deadline."""
    from pydantic import ValidationError

    from server_app.policy import KoalaPolicy, bundled_policy, read_policy_file

    data: dict = {"rounds": 5, "deadline_s": 300.0}
    source = args.policy or bundled_policy(args.dataset)  # digits: its own tuned policy file
    if source:
        data.update(read_policy_file(source))
    flags = {"rounds": args.rounds, "local_epochs": args.local_epochs, "rkd_epochs": args.rkd_epochs,
             "deadline_s": args.round_timeout, "seed": args.seed}  # fmt: skip
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.mode == "hetero":
        # the digits demo keeps its two measured architectures (server_app/policies/digits.toml)
        archs = ["mlp_tiny", "cnn_small"] if args.dataset == "digits" else ["mlp_tiny", "cnn_small", "mobilenet_micro"]
        data.update(strategy="koala_hetero", archs=archs)
    elif args.mode == "homo":
        data.update(strategy="koala_homo", archs=data.get("archs", ["cnn_small"])[:1])
    try:
        return KoalaPolicy.model_validate(data)
    except ValidationError as exc:
        from server_app.commands import describe_validation

        raise ValueError(describe_validation(exc, args, flags=DEMO_FLAGS, source=str(source or ""))) from None
