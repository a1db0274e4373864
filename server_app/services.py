"""ServerServices: the server's runtime parts in one container, started/stopped by the app lifespan.

Holds: the registry (Alembic-migrated on start), the MQTT link (server Last Will on
`server/status`), the device presence tracker, the Ingestor (validated results/status/progress),
the MqttFleet and the RoundOrchestrator (background thread). Nothing here is global: tests and the
demo build one around their own database and broker.

Subscriptions: device status and progress are plain subscriptions (retained status must reach
this server; brokers never deliver retained messages to shared subscriptions); results go through
a shared subscription `$share/koala-server/...` when the broker supports it, so several server
workers can split ingestion (a probe at start decides; amqtt has no $share).

Results are ingested by `server_app.ingest_worker` in batches off the MQTT thread and acknowledged
(manual PUBACK) only after the batch is committed; the broker's inflight window holds the backlog.

Session: the server connects with clean_session=True on purpose. With Mosquitto 2.0 a persistent
session that is gone (a worker stopped for good, a random client id) keeps receiving its share of
a shared subscription into a queue nobody reads; and persisted deliveries would arrive at start,
before the resumed round re-opens its collection. What a clean session costs: results delivered
to this process but not yet committed when it is killed (at most the inflight window) die with the
session — the resumed round re-assigns every participant without an accepted row, so the device
is asked again. A clean shutdown unsubscribes and drains first, so it loses nothing.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.cli import CommandError
from device_firmware_py.contract import codec, topics
from device_firmware_py.contract import messages as cm
from device_firmware_py.contract.errors import ContractError
from device_firmware_py.mqtt import MqttClient, Will
from server_app.ingest_budget import Budgets, DeviceBudget, topic_device
from server_app.intake_watchdog import INTERVAL_S as WATCHDOG_INTERVAL_S
from server_app.intake_watchdog import STALL_S as WATCHDOG_STALL_S
from server_app.policy import KoalaPolicy

log = logging.getLogger("koala.services")
SHARE_GROUP = "koala-server"
# all: one process does everything (the default). A server split over processes (docs/scale-out.md):
#   orchestrator  leads (leader lock), runs rounds, tracks presence; ingests nothing itself
#   ingest        accepts results from the shared subscription into the registry; any number of them
#   api           the REST API and dashboard on the registry; no MQTT
ROLES = ("all", "orchestrator", "ingest", "api")
BROKER_WAIT_S = 15.0  # how long start() waits for the broker before it gives up


@dataclass
class ServerOptions:
    """What the services need, taken from `server_app.config.Settings` by `from_settings`."""

    db_url: str
    data_dir: str
    proxy_path: str  # .npz x: the unlabeled proxy inputs (the same file the devices hold)
    test_path: str  # .npz x, y: the server's held-out test set
    # .npz y: labels of some proxy rows (-1 elsewhere; engine.robust.canary_filter); used when present
    proxy_labels_path: str | None = None
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_username: str | None = None
    broker_password: str | None = None
    broker_tls: bool = False
    broker_ca_file: str | None = None
    # `koala provision broker-files --out` directory (its koala-admin secret): lets the server shut a
    # flooding device out at the broker (server_app.quarantine); None: server-side budgets only
    broker_provision_dir: str | None = None
    client_id: str = ""
    shared_subscriptions: bool | None = None  # None: probe the broker
    share_group: str = SHARE_GROUP
    policy: KoalaPolicy = field(default_factory=KoalaPolicy)  # THE policy (also koala sim's); a dict is validated
    eval_samples: int | None = None
    torch_threads: int = 2
    device: str = "cpu"  # torch device of the large model (reverse KD, evaluation): cpu | cuda | cuda:N | auto
    start_orchestrator: bool = True
    # one leading server per registry (server_app.rounds.leader): others wait as hot standbys
    leader_lock: bool = True
    # what this process does (ROLES): everything, or one part of a server split over processes
    role: str = "all"
    # an ingestion worker's stable name: a persistent MQTT session under a fixed client id, so a
    # worker restarted by its supervisor gets back the results it held unacknowledged (docs/scale-out.md)
    worker_id: str | None = None
    # per-device message budgets, enforced on the network thread before decoding (ingest_budget)
    budgets: Budgets = field(default_factory=Budgets)
    # the intake watchdog (intake_watchdog): probe every interval, stalled after this much silence
    watchdog_interval_s: float = WATCHDOG_INTERVAL_S
    watchdog_stall_s: float = WATCHDOG_STALL_S

    def __post_init__(self) -> None:
        if not isinstance(self.policy, KoalaPolicy):
            self.policy = KoalaPolicy.model_validate(self.policy)
        if isinstance(self.budgets, dict):
            self.budgets = Budgets(**self.budgets)
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not one of {', '.join(ROLES)}")
        if self.worker_id is not None and self.role != "ingest":
            raise ValueError("worker_id names an ingestion worker: it needs role 'ingest'")

    @property
    def leads(self) -> bool:
        """Runs rounds (and so takes the leader lock)."""
        return self.role in ("all", "orchestrator")

    @property
    def ingests(self) -> bool:
        """Subscribes to results and accepts them into the registry."""
        return self.role in ("all", "ingest")


class ServerServices:
    """Start with `start()` (blocking until MQTT is connected), stop with `stop()`."""

    def __init__(self, options: ServerOptions, settings: Any = None):
        self.options = options
        self.settings = settings
        self.registry: Any = None
        self.link: MqttClient | None = None
        self.presence: Any = None
        self.ingestor: Any = None
        self.ingest_worker: Any = None
        self.results_filter: str | None = None
        self.fleet: Any = None
        self.orchestrator: Any = None
        self.store: Any = None
        self.shared: bool = False
        self.started = False
        self.leader: Any = None
        self.watchdog: Any = None
        self.follower: Any = None  # role ingest: the open round, read from the registry
        # a second MQTT connection for device status and progress (orchestrating roles): its own
        # broker queue, so a telemetry flood cannot fill the queue that results wait in
        self.telemetry: MqttClient | None = None
        self.budget: DeviceBudget | None = None
        self.status_writer: Any = None
        self.intake_watchdog: Any = None
        self.quarantine: Any = None
        # the large model for POST /api/v1/predict and the devices' cascade requests (a third MQTT
        # connection, server_app/predict_service.py: predictions never queue in front of results)
        self.predictor: Any = None
        self.predict_service: Any = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> ServerServices:
        """Map `server_app.config.Settings` onto ServerOptions (Settings is the server's one config)."""
        from device_firmware_py.mqtt import parse_broker_url

        b, p = settings.broker, settings.paths
        addr = parse_broker_url(b.url)
        opts = ServerOptions(
            db_url=settings.database.url, data_dir=str(p.artifacts_dir), proxy_path=str(p.proxy),
            test_path=str(p.test), proxy_labels_path=str(p.proxy_labels), broker_host=addr.host,
            broker_port=addr.port, broker_username=b.username,
            broker_password=_secret(b.password), broker_tls=b.tls, broker_ca_file=b.tls_ca,
            broker_provision_dir=str(b.provision_dir) if b.provision_dir else None,
            client_id=b.client_id, shared_subscriptions=True if b.shared_group else None,
            share_group=b.shared_group or SHARE_GROUP, policy=settings.policy, device=settings.device,
            role=settings.role, worker_id=settings.worker_id,
            budgets=settings.ingest.budgets(),
            watchdog_interval_s=settings.ingest.watchdog_interval_s, watchdog_stall_s=settings.ingest.watchdog_stall_s,
        )  # fmt: skip
        return cls(opts, settings)

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Start everything; a no-op when started. A failure the operator can fix (missing data file,
        unreachable database or broker) raises CommandError naming it and what to do, after
        undoing what was started."""
        if self.started:
            return
        self._stopping.clear()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from server_app.ingest import Ingestor, Presence
        from server_app.ingest_worker import subscribe_results
        from server_app.registry import Registry, RegistryUnavailable
        from server_app.rounds.store import RegistryStore

        o = self.options
        for what, path, setting in (("proxy set", o.proxy_path, "paths.proxy_path"), ("test set", o.test_path, "paths.test_path")):
            if not o.leads:
                break  # only the orchestrator reads the data sets
            if not Path(path).is_file():
                raise CommandError(
                    f"{what} {path} not found\n  set {setting} (env KOALA_{setting.upper().replace('.', '__')}) or "
                    f"paths.data_dir to where the .npz is; `koala demo` writes one per run")  # fmt: skip
        Path(o.data_dir).mkdir(parents=True, exist_ok=True)
        try:
            self.registry = Registry(o.db_url)
            rev = self.registry.upgrade()
        except (RegistryUnavailable, ImportError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CommandError(
                f"database {_redact(o.db_url)} not usable: {reason.removeprefix('database unavailable: ')}\n"
                f"  check database.url (env KOALA_DATABASE__URL, flag --database-url) and that the database "
                f"server is up and reachable") from exc  # fmt: skip
        log.debug("registry migrated url=%s revision=%s", _redact(o.db_url), rev)
        from server_app.models.predictor import LargePredictor, latest_export_in_registry

        self.predictor = LargePredictor(latest_export_in_registry(self.registry))  # loads on first use
        if o.role == "api":  # the REST API reads the registry; it needs no broker
            self.started = True
            log.info("role api: registry %s at revision %s", _redact(o.db_url), rev)
            return
        if o.leads and o.leader_lock:
            self._lead()
        if o.leads:  # leading now: spill files left by a server that died mid-round are stale
            from server_app.rounds.spill import clear_stale

            clear_stale(Path(o.data_dir) / "spill")
        self.store = RegistryStore(self.registry, o.data_dir)
        self.presence = Presence()
        self.presence.sync_revoked(set(self.store.revoked_devices()))  # revoked before this start: never online
        self.budget = DeviceBudget(o.budgets, epoch=self._open_round)
        self._start_quarantine()
        if o.role == "ingest":
            from server_app.rounds.follower import RoundFollower

            self.follower = RoundFollower(self.store, self.presence).start()
            self.ingestor = Ingestor(self.store, self.presence, self.follower.collection,
                                     refresh_collection=self.follower.refresh)  # fmt: skip
        else:
            from server_app.status_writer import StatusWriter

            self.ingestor = Ingestor(self.store, self.presence, lambda: self.fleet.collection if self.fleet else None)
            self.status_writer = StatusWriter(self.store, self.budget, apply_deferred=self.ingestor.on_status).start()
            self.ingestor.status_sink = self.status_writer.put
        self.link = self._mqtt_link()
        if o.role == "ingest":
            # Handler first, connect second: a persistent session's unacknowledged results are
            # redelivered right after CONNACK, and a delivery with no handler would be acknowledged
            # unread. A worker assumes a broker with shared subscriptions (say so with
            # broker.shared_group; shared_subscriptions False only for a single worker).
            self.shared = o.shared_subscriptions is not False
            self.results_filter = self._results_topic()
            self.ingest_worker = subscribe_results(self.link, self.results_filter, self.ingestor,
                                                   on_outcomes=self._send_verdicts, budget=self.budget)  # fmt: skip
        if not self.link.start(wait_s=BROKER_WAIT_S):
            raise CommandError(
                f"MQTT broker {o.broker_host}:{o.broker_port} not reachable within {BROKER_WAIT_S:.0f} s: "
                f"{self.link.last_error or 'no answer'}\n  check broker.url (env KOALA_BROKER__URL) and that "
                f"the broker is running and reachable from here")  # fmt: skip
        if o.role != "ingest":
            self.shared = o.shared_subscriptions if o.shared_subscriptions is not None else self._probe_shared()
        results = self._results_topic()
        if o.role == "ingest" and not self.shared:
            log.warning("shared subscriptions off: every ingestion worker receives every result (correct — the "
                        "registry takes each once — but each worker does all the work)")
        if o.leads:  # presence (retained status) and progress: the orchestrator's, never shared
            self._start_telemetry()
            self._start_predict()
        if o.role == "all":
            self.ingest_worker = subscribe_results(self.link, results, self.ingestor, on_outcomes=self._send_verdicts,
                                                   budget=self.budget)  # fmt: skip
            self.results_filter = results
        if o.ingests:
            from server_app.intake_watchdog import IntakeWatchdog

            self.intake_watchdog = IntakeWatchdog(self.link, worker=lambda: self.ingest_worker,
                                                  interval_s=o.watchdog_interval_s, stall_s=o.watchdog_stall_s).start()
        log.info("role %s: registry %s at revision %s; results=%s shared=%s quarantine=%s", o.role, _redact(o.db_url),
                 rev, results if o.ingests else "(not ingested here)", self.shared,
                 "on" if self.quarantine is not None else "off (no broker.provision_dir: a flooding device is dropped "
                 "here only, its flood still passes through the broker's queue for this server)")  # fmt: skip
        if o.role == "orchestrator":
            log.warning("role orchestrator accepts no results itself: run at least one `koala serve --role ingest` "
                        "on the same registry, broker and data directory (%s)", o.data_dir)
        if not o.leads:
            self.started = True
            return
        self._build_round_machinery()
        self.started = True
        if o.start_orchestrator:
            self.orchestrator.start()

    def _start_quarantine(self) -> None:
        """Shut flooding devices out at the broker when the admin account is at hand."""
        o = self.options
        assert self.budget is not None and self.store is not None
        if not o.budgets.quarantine_after:
            return
        if not o.broker_provision_dir:  # said once the broker is reached (the role's start line)
            return
        from server_app.provisioning.accounts import read_secret
        from server_app.provisioning.dynsec import BrokerControl, ControlEndpoint
        from server_app.provisioning.identity import ADMIN_ACCOUNT
        from server_app.quarantine import Quarantine

        endpoint = ControlEndpoint(o.broker_host, o.broker_port, o.broker_tls, o.broker_ca_file)
        control = BrokerControl(endpoint, ADMIN_ACCOUNT, read_secret(Path(o.broker_provision_dir), ADMIN_ACCOUNT))
        self.quarantine = Quarantine(control, Path(o.data_dir) / "quarantine.json", quarantine_s=o.budgets.quarantine_s,
                                     rearm=self.budget.rearm, event=self.store.event).start()  # fmt: skip
        self.budget.on_flood = self.quarantine.flood

    def _open_round(self) -> int | None:
        """The round being collected (None between rounds): the budget renews result allowances on it."""
        if self.ingestor is None:
            return None
        col = self.ingestor._collection()
        return None if col is None else int(col.round_id)

    def _start_telemetry(self) -> None:
        """Status and progress on a connection of their own, each message gated by the device's
        budget before it is decoded; an over-budget status is deferred (the newest one is applied
        when the device's budget refills), over-budget progress is dropped."""
        o = self.options
        assert self.ingestor is not None and self.budget is not None
        budget, ingestor = self.budget, self.ingestor

        def on_status(topic: str, payload: bytes) -> None:
            dev = topic_device(topic)
            if budget.allow("status", dev):
                ingestor.on_status(topic, payload)
            elif dev is not None:
                budget.defer_status(dev, topic, payload)

        def on_progress(topic: str, payload: bytes) -> None:
            if budget.allow("progress", topic_device(topic)):
                ingestor.on_progress(topic, payload)

        base = o.client_id or "koala-server"
        self.telemetry = MqttClient(f"{base}-telemetry-{os.getpid()}-{secrets.token_hex(3)}", o.broker_host,
                                    o.broker_port, username=o.broker_username, password=o.broker_password,
                                    tls=o.broker_tls, ca_file=o.broker_ca_file, clean_session=True)  # fmt: skip
        self.telemetry.subscribe(topics.filter_device_status(), 1, on_status)
        self.telemetry.subscribe(topics.filter_progress(), 0, on_progress)
        if not self.telemetry.start(wait_s=BROKER_WAIT_S):
            raise CommandError(f"MQTT broker {o.broker_host}:{o.broker_port}: second (telemetry) connection refused: "
                               f"{self.telemetry.last_error or 'no answer'}")  # fmt: skip

    def _start_predict(self) -> None:
        """The cascade's predict requests on a connection of their own, budgeted per device."""
        from server_app.predict_service import PredictService

        o = self.options
        try:
            self.predict_service = PredictService(self.predictor, self.budget, host=o.broker_host, port=o.broker_port,
                                                  username=o.broker_username, password=o.broker_password,
                                                  tls=o.broker_tls, ca_file=o.broker_ca_file,
                                                  client_id=o.client_id or "koala-server").start(BROKER_WAIT_S)  # fmt: skip
        except RuntimeError as exc:
            raise CommandError(f"MQTT broker {o.broker_host}:{o.broker_port}: third (predict) connection refused: {exc}") from None

    def _results_topic(self) -> str:
        """The results filter: the share group's when the broker shares (self.shared), else plain."""
        f = topics.filter_results()
        return topics.shared(self.options.share_group, f) if self.shared else f

    def _mqtt_link(self) -> MqttClient:
        """The server's client. Leading roles announce `server/status` (retained, Last Will); an
        ingestion worker with a worker_id keeps a persistent session under a fixed client id."""
        o = self.options
        base = o.client_id or "koala-server"
        if o.role == "ingest":
            cid = f"{base}-ingest-{o.worker_id}" if o.worker_id else f"{base}-ingest-{os.getpid()}-{secrets.token_hex(3)}"
            return MqttClient(cid, o.broker_host, o.broker_port, username=o.broker_username, password=o.broker_password,
                              tls=o.broker_tls, ca_file=o.broker_ca_file, clean_session=o.worker_id is None,
                              manual_ack=True)  # fmt: skip
        offline = codec.encode_control(cm.ServerStatus(state="offline"))
        return MqttClient(
            o.client_id or f"koala-server-{os.getpid()}-{secrets.token_hex(3)}", o.broker_host, o.broker_port,
            username=o.broker_username, password=o.broker_password, tls=o.broker_tls, ca_file=o.broker_ca_file,
            clean_session=True, will=Will(topics.server_status(), offline, 1, True),
            on_connect=self._on_connect, manual_ack=True,
        )  # fmt: skip

    def _lead(self) -> None:
        """Become the registry's leading server, waiting as a standby while another one leads."""
        from server_app.rounds.leader import LeaderLock, LeaderWatchdog

        self.leader = LeaderLock(self.options.db_url)
        if not self.leader.try_acquire():
            log.warning("standby: another koala server leads on %s; waiting to take over", _redact(self.options.db_url))
            if not self.leader.wait(self._stopping):
                raise CommandError("stopped while waiting as a standby")
            log.warning("standby takes over: this server leads now")
        log.debug("leading: leader lock held (%s)", self.leader.kind)

        def lost() -> None:  # fence: stop leading; the service manager restarts this process as a standby
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

        self.watchdog = LeaderWatchdog(self.leader, lost).start()

    def _on_connect(self) -> None:
        if self.link is not None:
            online = codec.encode_control(cm.ServerStatus(state="online", capabilities={"shared_subscriptions": self.shared}))
            self.link.publish(topics.server_status(), online, 1, True)

    def _send_verdicts(self, outcomes: list[Any]) -> None:
        """Tell each device what became of its result (after the batch is committed): a device that
        follows only the contract learns why a result was refused. QoS 1, never retained."""
        if self.link is None:
            return
        for o in outcomes:
            if o.device_id is None:  # not even the topic named a device: nobody to tell
                continue
            rid = o.round_id if isinstance(o.round_id, int) and 0 <= o.round_id <= topics.MAX_ROUND_ID else None
            try:
                msg = cm.ResultVerdict(device_id=o.device_id, status=o.status, round_id=rid, reason=o.reason)
                self.link.publish(topics.device_verdict(o.device_id), codec.encode_control(msg), 1, False)
            except (ContractError, RuntimeError, ValueError) as exc:  # a verdict is advice: never fail ingestion
                log.debug("verdict not sent device=%s error=%s", o.device_id, exc)

    def _probe_shared(self, timeout_s: float = 2.0) -> bool:
        """Does the broker deliver `$share/...`? (amqtt: SUBACK ok, nothing delivered.)"""
        assert self.link is not None
        token = secrets.token_hex(4)
        probe = f"{topics.PREFIX}/server/probe-{token}"
        got = threading.Event()
        self.link.subscribe(f"$share/koala-probe-{token}/{probe}", 1, lambda t, p: got.set())
        time.sleep(0.2)
        self.link.publish(probe, b"probe", 1, False)
        ok = got.wait(timeout_s)
        self.link.unsubscribe(f"$share/koala-probe-{token}/{probe}")
        log.info("shared subscription probe supported=%s", ok)
        return ok

    def _build_round_machinery(self) -> None:
        """Strategy (large model on the proxy set), evaluation on the test set, fleet, orchestrator."""
        import torch

        from device_firmware_py.runtime.manifest import format_input
        from device_firmware_py.runtime.small_model import SmallModel
        from server_app.engine.strategies import build_strategy
        from server_app.models.large import accuracy, build_large_model, resolve_device
        from server_app.rounds.deadlines import DeadlinePlanner
        from server_app.rounds.fleet import MqttFleet
        from server_app.rounds.orchestrator import RoundOrchestrator

        o, pol = self.options, self.options.policy
        torch.set_num_threads(o.torch_threads)
        torch.manual_seed(pol.seed)
        with np.load(o.proxy_path, allow_pickle=False) as z:
            proxy_x = np.asarray(z["x"], np.float32)
        with np.load(o.test_path, allow_pickle=False) as z:
            x_test, y_test = np.asarray(z["x"], np.float32), np.asarray(z["y"], np.int64)
        proxy_labels = None
        if o.proxy_labels_path and Path(o.proxy_labels_path).is_file():
            with np.load(o.proxy_labels_path, allow_pickle=False) as z:
                proxy_labels = np.asarray(z["y"], np.int64)
            if len(proxy_labels) != len(proxy_x):
                raise CommandError(f"{o.proxy_labels_path} labels {len(proxy_labels)} rows, the proxy set has "
                                   f"{len(proxy_x)}\n  write both with the same `koala data prepare`")  # fmt: skip
            log.info("proxy labels known rows=%d of=%d (canary_filter)", int((proxy_labels >= 0).sum()), len(proxy_x))
        shape = tuple(int(s) for s in proxy_x.shape[1:])
        num_classes = int(max(int(y_test.max()) + 1, 10))
        large = build_large_model(pol.large, shape, num_classes, pol.seed).to(resolve_device(o.device))
        factory = lambda arch: SmallModel(f"{arch}_{format_input(shape)}", num_threads=1)  # noqa: E731
        strategy = build_strategy(pol, large=large, proxy_x=proxy_x, small_factory=factory, proxy_labels=proxy_labels)
        spill_dir = Path(o.data_dir) / "spill"  # per-device tensors of a round wait on disk, not in memory
        if hasattr(strategy, "spill_dir"):  # KOALA: its per-device model logits (agreement filter) too
            strategy.spill_dir = spill_dir
        from device_firmware_py.config import file_sha256

        proxy_digest = file_sha256(o.proxy_path)
        rng = np.random.default_rng(pol.seed + 1)
        sub = rng.permutation(len(y_test))[: o.eval_samples] if o.eval_samples else np.arange(len(y_test))

        def evaluate(round_id: int) -> dict[str, Any]:
            return {"large_test_acc": accuracy(strategy.large_model, x_test[sub], y_test[sub])}

        assert self.link is not None  # connected by _start before the round loop is built
        self.fleet = MqttFleet(
            self.link.publish, self.presence.online, self.store,
            num_classes=num_classes, proxy_size=len(proxy_x), proxy_digest=proxy_digest,
            weight_shapes=lambda arch: [tuple(w.shape) for w in factory(arch).get_weights()],
            default_timeout_s=pol.deadline_s,
            planner=DeadlinePlanner(pol.deadline_s, pol.deadline_factor, pol.deadline_min_s),
            progress_of=self.presence.progress.get,
            spill_dir=spill_dir,
        )  # fmt: skip
        self.orchestrator = RoundOrchestrator(
            strategy, self.fleet, self.store, self.link.publish, rounds=pol.rounds, round_timeout_s=pol.deadline_s,
            models_dir=Path(o.data_dir) / "models", evaluate=evaluate, min_devices=pol.min_devices,
            wait_devices_s=pol.min_devices_timeout_s, strategy_name=pol.strategy,
            before_round=lambda: self.presence.sync_revoked(set(self.store.revoked_devices())),
            config={"policy": pol.model_dump(mode="json"), "proxy_sha256": proxy_digest, "proxy_size": len(proxy_x)},
            on_model=self._on_model(self._model_exporter(pol, shape, num_classes, proxy_x, proxy_digest, len(y_test))),
        )  # fmt: skip
        from server_app.rounds.orchestrator import restore_schedule_policy

        restore_schedule_policy(self.registry, self.orchestrator)  # a PUT /rounds/schedule survives restarts

    def _on_model(self, exporter: Any) -> Any:
        """Export each published version, then let the predictor serve it."""

        def hook(version: int, round_id: int | None, metrics: dict[str, Any], state: dict[str, Any]) -> None:
            exporter.publish(version, round_id, metrics, state)
            if self.predictor is not None:
                self.predictor.notify()

        hook.exporter = exporter  # type: ignore[attr-defined]
        return hook

    def _model_exporter(self, pol: KoalaPolicy, shape: tuple[int, ...], num_classes: int, proxy_x: np.ndarray,
                        proxy_digest: str, test_size: int) -> Any:
        """Writes the portable export of every model version (server_app/models/export.py, docs/models.md)."""
        from device_firmware_py.config import file_sha256
        from server_app.models.card import ExportContext, read_dataset_info
        from server_app.models.export import ModelExporter

        o = self.options
        info = read_dataset_info(o.proxy_path)
        data = {"proxy_sha256": proxy_digest, "proxy_size": len(proxy_x), "test_sha256": file_sha256(o.test_path),
                "test_size": test_size}  # fmt: skip
        ctx = ExportContext.from_policy(pol, shape, num_classes, dataset=info.get("dataset"), data=data,
                                        calibration_x=proxy_x[:256], proxy_x=proxy_x)  # fmt: skip
        return ModelExporter(Path(o.data_dir) / "models", ctx)

    # ------------------------------------------------------------------- stop
    def stop(self) -> None:
        self._stopping.set()  # a standby waiting for the leader lock gives up
        with self._lock:
            # results first: no new deliveries, ingest (and acknowledge) what arrived into the round
            # that is still collecting, so a clean shutdown loses nothing
            if self.link is not None and self.results_filter is not None:
                self.link.unsubscribe(self.results_filter, wait_s=2.0)
            if self.intake_watchdog is not None:
                self.intake_watchdog.stop()
                self.intake_watchdog = None
            if self.ingest_worker is not None:
                self.ingest_worker.stop(timeout_s=10.0)
                self.ingest_worker = None
            if self.telemetry is not None:
                self.telemetry.stop()
                self.telemetry = None
            if self.predict_service is not None:
                self.predict_service.stop()
                self.predict_service = None
            if self.status_writer is not None:
                self.status_writer.stop()
                self.status_writer = None
            if self.quarantine is not None:
                self.quarantine.stop()
                self.quarantine = None
            if self.orchestrator is not None:
                self.orchestrator.stop()
            if self.follower is not None:
                self.follower.stop()
                self.follower = None
            if self.link is not None:
                if self.link.connected.is_set() and self.options.leads:
                    offline = codec.encode_control(cm.ServerStatus(state="offline"))
                    self.link.publish(topics.server_status(), offline, 1, True, wait_s=2.0)
                self.link.stop()
                self.link = None
            if self.registry is not None:
                self.registry.dispose()
            if self.watchdog is not None:
                self.watchdog.stop()
                self.watchdog = None
            if self.leader is not None:  # last: a standby may lead as soon as this is released
                self.leader.release()
                self.leader = None
            self.started = False

    def readiness(self) -> dict[str, bool]:
        """What this process's role needs, each checked (GET /readyz)."""
        o, orch = self.options, self.orchestrator
        checks = {"database": bool(self.registry is not None and self.registry.ping())}
        if o.role != "api":
            checks["mqtt"] = bool(self.link is not None and self.link.connected.is_set())
            if o.leads:
                checks["mqtt"] = checks["mqtt"] and bool(self.telemetry is not None and self.telemetry.connected.is_set())
        if o.ingests:  # connected is not enough: the broker must deliver (intake_watchdog)
            dog, worker = self.intake_watchdog, self.ingest_worker
            checks["intake"] = bool(dog is not None and dog.healthy and worker is not None and worker.alive)
        if o.leads:
            checks["orchestrator"] = bool(orch is not None and (orch.alive or orch.state == "finished"))
            checks["leader"] = bool(self.leader is None or self.leader.held)
        if o.role == "ingest":
            checks["round_view"] = bool(self.follower is not None and self.follower.last_error is None)
        return checks


def _secret(v: Any) -> str | None:
    if v is None:
        return None
    return v.get_secret_value() if hasattr(v, "get_secret_value") else str(v)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<url>"
