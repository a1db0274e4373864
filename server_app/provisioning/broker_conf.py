"""Render the production Mosquitto config and size its limits from what we actually send.

The largest message on our wire is a FedAvg-small round assignment: the teacher's logits on the
proxy set (float16) plus the global small-model weights (float32), plus a small header. FedAvg of
the *large* model (~734k params, ~3 MB) is simulation-only and never crosses the broker, so it
does not set the limit: an oversize message is a bug or an attack and the broker drops it.
"""

from __future__ import annotations

import getpass
import string
from dataclasses import dataclass, field
from pathlib import Path

# Where the committed template lives (this file is server_app/provisioning/broker_conf.py).
TEMPLATE = Path(__file__).resolve().parents[2] / "broker_config" / "mosquitto.prod.conf"

MiB = 1024 * 1024


def required_packet_size(
    proxy_samples: int = 5000,
    num_classes: int = 10,
    logit_bytes: int = 2,
    max_small_params: int = 60_000,
    weight_bytes: int = 4,
    header_bytes: int = 16 * 1024,
    safety: float = 2.5,
) -> int:
    """Bytes for the biggest assignment/result times `safety`, rounded up to a whole MiB.

    Defaults: 5000x10 float16 logits (100 kB) + 60k float32 params (240 kB) + 16 kB header
    = ~356 kB; x2.5 (room for float32 logits, base64 framing, a larger proxy set) -> 1 MiB.
    """
    raw = proxy_samples * num_classes * logit_bytes + max_small_params * weight_bytes + header_bytes
    need = int(raw * safety)
    return -(-need // MiB) * MiB


def result_frame_bytes(proxy_samples: int = 5000, num_classes: int = 10, logit_bytes: int = 2,
                       max_small_params: int = 60_000, weight_bytes: int = 4, header_bytes: int = 16 * 1024) -> int:
    """The largest result a device uploads: logits on the proxy set + (FedAvg-small) its weights.
    Defaults: 100 kB + 240 kB + 16 kB = ~356 kB."""
    return proxy_samples * num_classes * logit_bytes + max_small_params * weight_bytes + header_bytes


def queue_limits(fleet_size: int, result_bytes: int | None = None) -> tuple[int, int]:
    """(max_queued_messages, max_queued_bytes) so that the server's results subscription can hold
    whole rounds: Mosquitto drops QoS 1 messages beyond these *per-client* limits when a subscriber
    falls behind (the device already has its PUBACK: the result would be lost).

    fleet_size results per round x 2 (the round being ingested + QoS 1 redeliveries / the next
    round's first results), bytes the same count x the largest result frame. Mosquitto 2.0 has
    only global limits, and devices need them too: a device's queue holds ~1 assignment (offline
    devices are not assigned), so a high limit costs devices nothing; the bytes are a cap on a
    backlog, not an allocation.
    """
    messages = 2 * max(1, fleet_size)
    return messages, messages * (result_bytes if result_bytes is not None else result_frame_bytes())


def _default_plugin() -> str:
    from server_app.provisioning.dynsec import DOCKER_PLUGIN, find_plugin

    return find_plugin() or DOCKER_PLUGIN


@dataclass
class BrokerConf:
    """Values for the ${placeholders} of broker_config/mosquitto.prod.conf."""

    conf_dir: Path  # where password/ACL/certs live as the broker sees them
    data_dir: Path
    tls_port: int = 8883
    tls_bind: str = "0.0.0.0"
    server_port: int | None = 1883  # plain listener for the co-located server, loopback only
    server_bind: str = "127.0.0.1"
    max_packet_size: int = field(default_factory=required_packet_size)
    max_connections: int = 1024
    fleet_size: int | None = None  # devices per round the server must be able to queue; None: max_connections
    result_bytes: int = field(default_factory=result_frame_bytes)
    # broker -> subscriber window (v3.1.1); with the server's manual ack it is also its ingest batch
    max_inflight_messages: int = 100
    max_keepalive: int = 300
    require_certificate: bool = False
    run_as_user: str = "mosquitto"
    log_dest: str = "stdout"
    # the dynamic-security plugin as the broker host sees it (docker image: /usr/lib/...)
    dynsec_plugin: str = field(default_factory=_default_plugin)

    def values(self) -> dict[str, str]:
        c = self.conf_dir
        queued = queue_limits(self.fleet_size or self.max_connections, self.result_bytes)
        if self.server_port is None:
            server_listener = "# (no plain listener: the server connects over TLS too)"
        else:
            server_listener = (
                "# --- plain listener for the server on the same host (never reachable from devices)\n"
                f"listener {self.server_port} {self.server_bind}\nprotocol mqtt\n"
                f"max_connections {self.max_connections}"
            )
        return {
            "dynsec_plugin": self.dynsec_plugin,
            "dynsec_file": str(c / "dynamic-security.json"),
            "run_as_user": self.run_as_user,
            "data_dir": str(self.data_dir).rstrip("/"),
            "max_packet_size": str(self.max_packet_size),
            "max_queued_messages": str(queued[0]),
            "max_queued_bytes": str(queued[1]),
            "max_inflight_messages": str(self.max_inflight_messages),
            "max_keepalive": str(self.max_keepalive),
            "log_dest": self.log_dest,
            "tls_port": str(self.tls_port),
            "tls_bind": self.tls_bind,
            "max_connections": str(self.max_connections),
            "cafile": str(c / "certs" / "ca.crt"),
            "certfile": str(c / "certs" / "server.crt"),
            "keyfile": str(c / "certs" / "server.key"),
            "require_certificate": "true" if self.require_certificate else "false",
            "server_listener": server_listener,
        }


def render(conf: BrokerConf, template: Path = TEMPLATE) -> str:
    """The config text; a missing placeholder value raises instead of leaving `${x}` behind."""
    return string.Template(template.read_text()).substitute(conf.values())


def local_user() -> str:
    """For brokers started by hand/tests: run as whoever starts it (no privilege switch)."""
    return getpass.getuser()
