"""`koala serve`: the server (FastAPI + registry + MQTT ingestion + round orchestrator) under uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import sys

HELP = "run the KOALA server: REST API, SQL registry, MQTT ingestion and the round orchestrator"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="settings file (.toml/.yaml/.json); KOALA_* env overrides it")
    p.add_argument("--policy", help="KOALA policy file (the same file koala sim/demo --policy read); "
                   "replaces the settings' [policy] section")
    p.add_argument("--host", help="API bind address (default: settings api.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="API port (default: settings api.port)")
    p.add_argument("--database-url", "--db", dest="database_url",
                   help="registry database URL (default: settings database.url / KOALA_DATABASE__URL)")
    p.add_argument("--broker", help="broker URL mqtt://host:port (default: settings broker.url / KOALA_BROKER__URL)")
    p.add_argument("--no-rounds", action="store_true", help="serve the API and ingest, but start no rounds")
    p.add_argument("--role", choices=("all", "orchestrator", "ingest", "api"),
                   help="what this process does when the server is split over processes (default: settings role, "
                   "all): orchestrator = rounds + presence, ingest = results from the shared subscription into the "
                   "registry (run several), api = REST API only; see docs/scale-out.md")
    p.add_argument("--worker-id", help="role ingest: this worker's stable name (persistent MQTT session; restart "
                   "it under a supervisor with the same name)")
    p.add_argument("--print-config", action="store_true", help="print the effective settings (secrets hidden) and exit")


def run(args: argparse.Namespace) -> int:
    import json
    import logging

    import uvicorn

    from device_firmware_py.logs import configure_logging
    from server_app.api.app import create_app
    from server_app.config import ConfigError, load_settings
    from server_app.policy import PolicyError, read_policy_file
    from server_app.services import ServerServices

    try:
        overrides: dict = {"policy": read_policy_file(args.policy)} if args.policy else {}
        if args.database_url:
            overrides["database"] = {"url": args.database_url}
        if args.broker:
            overrides["broker"] = {"url": args.broker}
        if args.role:
            overrides["role"] = args.role
        if args.worker_id:
            overrides["worker_id"] = args.worker_id
        settings = load_settings(args.config, **overrides)
    except (ConfigError, PolicyError) as exc:
        print(f"koala serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(settings.redacted(), indent=1, default=str))
        return 0
    configure_logging(settings.log_level, settings.log_format)
    if settings.log_format == "json":  # native libraries' own stderr lines become JSON objects too
        from device_firmware_py.logs import json_native_stderr

        json_native_stderr()
    if settings.log_level != "DEBUG":  # alembic's INFO lines (plugins, "Context impl") are noise here
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from server_app.commands import STOPPING

    class _Server(uvicorn.Server):  # says "stopping (Ctrl-C again to force)..." on the first Ctrl-C / SIGTERM
        def handle_exit(self, sig: int, frame: object) -> None:
            if not self.should_exit:  # a log record: with log_format json every line stays one JSON object
                logging.getLogger("koala.serve").info(STOPPING)
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    host = args.host or settings.api.host
    port = args.port or settings.api.port
    _check_listen(host, port)
    services = ServerServices.from_settings(settings)
    if args.no_rounds:
        services.options.start_orchestrator = False
    # Start before uvicorn (its lifespan start is then a no-op): a wrong broker, database or data
    # path is one CommandError line here instead of uvicorn's "Application startup failed" traceback.
    services.start()
    try:
        app = create_app(services)
        logging.getLogger("koala.serve").info("serving api=http://%s:%d broker=%s db=%s", host, port,
                                              settings.broker.url, services.options.db_url.split("@")[-1])  # fmt: skip
        # Bounded graceful shutdown: open dashboard SSE streams must not hold a Ctrl-C for long.
        # log_config=None: uvicorn's access/error loggers go through our root handler (same format)
        config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level.lower(),
                                timeout_graceful_shutdown=5, log_config=None)
        server = _Server(config)
        with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run
            server.run()
    finally:
        services.stop()
    return 0 if server.started else 3  # uvicorn.run's STARTUP_FAILURE


def _check_listen(host: str, port: int) -> None:
    """Fail with one line when the API address cannot be bound (port taken, address not local)."""
    import socket

    from device_firmware_py.cli import CommandError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}\n"
                           f"  choose another --port / --host (settings api.port, api.host)") from None
