"""Field link profiles: real KOALA rounds with every device behind its own faulty link.

Why: a device in the field talks to the broker over Wi-Fi or cellular, which are slow, jittery and
drop. The claim under test is that MQTT keepalive, QoS 1 redelivery, the agent's resume-from-state
and the server's idempotent ingestion carry a round through such a link: rounds complete, no
result is lost, none is counted twice.

The stack is the one `koala demo` runs (`DemoRun`: private Mosquitto, the real server in this
process, each device agent its own OS process), except that each agent's broker URL points at its
own `LinkFaultProxy` (bench/link_fault.py) in front of the broker. The server talks to the broker
directly: the data-centre side of the link is not what is being tested.

Counted per profile, from the server's registry and ingestor (not from the devices' word):
  rounds_completed    rounds that reached `completed`
  results_lost        participants of a round whose result was never accepted (whatever the reason)
  duplicates          results accepted more than once (ingestor "accepted" outcomes - accepted rows)
  redeliveries        results that arrived again and were recognised as the same bytes (harmless)
  seconds_per_round   mean of the rounds' wall time (t_round_wall_s: assignment -> aggregated)
  bytes_per_round     bytes the device links carried (both directions, all devices, MQTT included)
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.link_fault import LinkFaultProxy, LinkShape, Trigger

UPLOAD_CUT_AFTER = 1000  # bytes of the result PUBLISH (topic included) delivered before the fault hits


@dataclass(frozen=True)
class LinkProfile:
    """One kind of link: its steady shape plus the faults it suffers during a run."""

    name: str
    shape: LinkShape = LinkShape()
    description: str = ""
    cut_mid_upload: bool = False  # the first result upload is cut after UPLOAD_CUT_AFTER bytes
    outage_mid_upload_s: float | None = None  # ... and the link stays down this long
    half_open_mid_upload: bool = False  # ... or goes silent without closing (keepalive must notice)
    flap_period_s: float | None = None  # the link is cut every period ...
    flap_down_s: float = 2.0  # ... and stays down this long
    rounds: int | None = (
        None  # rounds to run instead of the caller's (flapping: enough to span several flaps)
    )

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        return d


PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in (
        LinkProfile("loopback", description="clean loopback through the proxy: the baseline"),
        LinkProfile("wifi", LinkShape(delay_s=0.020, rate_bps=10e6), "20 ms one way, 10 Mbit/s"),
        LinkProfile(
            "cellular",
            LinkShape(delay_s=0.150, jitter_s=0.050, rate_bps=1e6),
            "150 ms +- 50 ms one way, 1 Mbit/s; a 30 s outage begins 1,000 bytes into the first "
            "result upload",
            outage_mid_upload_s=30.0,
        ),
        LinkProfile(
            "flapping",
            LinkShape(delay_s=0.020, rate_bps=10e6),
            "Wi-Fi shape, cut every 20 s and down 2 s each time",
            flap_period_s=20.0,
            flap_down_s=2.0,
            rounds=10,
        ),
        LinkProfile(
            "half_open",
            LinkShape(delay_s=0.020, rate_bps=10e6),
            "Wi-Fi shape; the first result upload goes silent midway without a close "
            "(only MQTT keepalive can tell)",
            half_open_mid_upload=True,
        ),
    )
}


def _field_run_class() -> type:
    """DemoRun with a LinkFaultProxy per device (imported late: the server stack is heavy)."""
    from server_app.demo.launcher import DemoRun

    class FieldRun(DemoRun):
        """`DemoRun` whose agents reach the broker through one LinkFaultProxy each (`self.links`)."""

        def __init__(self, cfg: Any, profile: LinkProfile):
            super().__init__(cfg)
            self.profile = profile
            self.links: dict[str, LinkFaultProxy] = {}
            self.triggers: dict[str, Trigger] = {}

        def _write_fleet(self) -> None:
            from device_firmware_py.contract import topics
            from server_app.demo.launcher import _host_port

            super()._write_fleet()
            host, port = _host_port(self.broker_url)
            p = self.profile
            for i, d in enumerate(self.layout.devices):
                dev = d["device_id"]
                link = LinkFaultProxy(host, port, p.shape, seed=i).start()
                self.links[dev] = link
                cfg_path = Path(d["config_path"])
                cfg = json.loads(cfg_path.read_text())
                cfg["broker_url"] = link.url
                cfg_path.write_text(json.dumps(cfg))
                pattern = topics.device_result(dev).encode()
                if p.outage_mid_upload_s is not None:
                    t = Trigger(
                        pattern, "outage", after_bytes=UPLOAD_CUT_AFTER, seconds=p.outage_mid_upload_s
                    )
                elif p.half_open_mid_upload:
                    t = Trigger(pattern, "half_open", after_bytes=UPLOAD_CUT_AFTER)
                elif p.cut_mid_upload:
                    t = Trigger(pattern, "cut", after_bytes=UPLOAD_CUT_AFTER)
                else:
                    continue
                self.triggers[dev] = link.arm(t)

        def _start_agents(self) -> None:
            super()._start_agents()
            if self.profile.flap_period_s is not None:
                for link in self.links.values():
                    link.flap(self.profile.flap_period_s, self.profile.flap_down_s)

        def stop(self) -> None:
            try:
                super().stop()
            finally:
                for link in self.links.values():
                    link.close()

    return FieldRun


def make_field_run(profile: LinkProfile, run_dir: Path, *, dataset: str = "fashion-mnist", devices: int = 2,
                   rounds: int = 3, proxy_size: int = 1000, train_size: int | None = 1200, test_size: int | None = 500,
                   deadline_s: float = 120.0, local_epochs: int = 5, **policy: Any) -> Any:  # fmt: skip
    """A FieldRun (not started) for `profile`: the demo's model and plan on a small, quick fleet."""
    from server_app.demo.launcher import DemoConfig
    from server_app.policy import KoalaPolicy

    pol = KoalaPolicy(rounds=rounds, deadline_s=deadline_s, local_epochs=local_epochs, quorum_fraction=1.0,
                      large={"width": 8, "options": {"fc": 32}}, **policy)  # fmt: skip
    cfg = DemoConfig(run_dir=str(run_dir), dataset=dataset, devices=devices, proxy_size=proxy_size,
                     train_size=train_size, test_size=test_size, policy=pol, torch_threads=1)  # fmt: skip
    return _field_run_class()(cfg, profile)


@dataclass
class ProfileResult:
    name: str
    rounds: int
    rounds_completed: int
    results_lost: int
    duplicates: int
    redeliveries: int
    seconds_per_round: float | None
    round_seconds: list[float]  # each round's t_round_wall_s, in round order
    bytes_per_round: float | None
    wall_s: float
    assignments: dict[str, dict[str, str]] = field(default_factory=dict)  # round -> device -> status
    link: dict[str, Any] = field(default_factory=dict)
    agent_republishes: dict[str, int] = field(default_factory=dict)
    ingest_outcomes: dict[str, int] = field(
        default_factory=dict
    )  # the ingestor's counts (rejections by reason)
    profile: dict[str, Any] = field(default_factory=dict)


def measure(run: Any, wall_s: float) -> ProfileResult:
    """The profile's numbers, from the finished run's registry, ingestor and proxies."""
    from server_app.registry import crud

    reg = run.services.registry
    rounds = {r.id: r for r in reg.run(crud.list_rounds, limit=crud.MAX_PAGE)}
    rows = list(reg.run(crud.list_assignments, limit=crud.MAX_PAGE))
    statuses: dict[str, dict[str, str]] = {}
    for a in rows:
        statuses.setdefault(str(a.round_id), {})[a.device_id] = a.status
    accepted_rows = sum(1 for a in rows if a.status == "accepted")
    counts = run.services.ingestor.counts
    walls = [
        float(r.metrics["t_round_wall_s"])
        for _, r in sorted(rounds.items())
        if (r.metrics or {}).get("t_round_wall_s")
    ]
    stats = {dev: link.stats() for dev, link in run.links.items()}
    total_bytes = sum(s.bytes_up + s.bytes_down for s in stats.values())
    done = sum(1 for r in rounds.values() if r.state == "completed")
    link_doc: dict[str, Any] = {
        dev: {k: v for k, v in asdict(s).items() if k != "events"} | {"events": [e for _, e in s.events][:40]}
        for dev, s in stats.items()
    }
    republish = {}
    for dev in run.links:
        log = run.run_dir / "logs" / f"{dev}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        republish[dev] = len(re.findall(r"re-publishing result", text))
    return ProfileResult(
        name=run.profile.name, rounds=len(rounds), rounds_completed=done,
        results_lost=sum(1 for a in rows if a.status != "accepted"),
        duplicates=int(counts.get("accepted", 0)) - accepted_rows, redeliveries=int(counts.get("duplicate", 0)),
        seconds_per_round=sum(walls) / len(walls) if walls else None, round_seconds=walls,
        bytes_per_round=total_bytes / len(rounds) if rounds else None, wall_s=wall_s, assignments=statuses,
        link=link_doc, agent_republishes=republish, ingest_outcomes=dict(counts), profile=run.profile.summary(),
    )  # fmt: skip


def run_profile(profile: LinkProfile, run_dir: Path, *, timeout_s: float = 900.0, **kw: Any) -> ProfileResult:
    """Start the fleet behind `profile`'s links, run its rounds, measure, stop."""
    if profile.rounds is not None:
        kw["rounds"] = profile.rounds
    run = make_field_run(profile, run_dir, **kw)
    t0 = time.monotonic()
    try:
        run.start()
        finished = run.wait(timeout_s=timeout_s, progress=False)
        res = measure(run, time.monotonic() - t0)
        if not finished:
            res.link["timed_out"] = True
        return res
    finally:
        run.stop()
