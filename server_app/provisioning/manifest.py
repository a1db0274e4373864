"""The fleet manifest: one YAML file naming the broker, the registry and every device.

    koala provision fleet deploy/fleet.example.yml --out runs/fleet

is `add` + `broker-files` + `bundle` for every device listed (see server_app/commands/provision.py).
The file is validated here, strictly: an unknown key, an unsafe device id, an unknown architecture
or a duplicate id is a `ManifestError` with a one-line message (the command prints it and exits 2).

Relative paths to *inputs* (proxy, wheelhouse, shipped data) are taken from the manifest's own
directory; relative *output* directories (broker.dir, bundles.out, server.data_dir) from the
`--out` workspace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ManifestError(ValueError):
    """The manifest cannot be used; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSpec(_Strict):
    url: str = Field(min_length=1, description="registry URL, as the server's database.url")


class BrokerSpec(_Strict):
    url: str = Field(description="what devices dial, e.g. mqtts://broker.lan:8883")
    # mosquitto: one node (dynamic-security); nats: an N-node NATS Server cluster with MQTT +
    # JetStream (server_app/provisioning/nats_cluster.py, docs/broker-cluster.md)
    kind: Literal["mosquitto", "nats"] = "mosquitto"
    nodes: int = Field(1, ge=1, le=9)
    cluster_hosts: list[str] = Field([], description="nats: one host per node (same ports on each); empty: all on 127.0.0.1, ports + i")
    cluster_port: int = Field(6222, ge=1, le=65535)
    client_port: int = Field(4222, ge=1, le=65535)
    monitor_port: int = Field(8222, ge=1, le=65535)
    dir: Path = Path("broker")
    profile: Literal["local", "docker"] = "local"
    tls_hosts: list[str] = []
    tls_port: int = Field(8883, ge=1, le=65535)
    tls_bind: str = "0.0.0.0"
    plain_port: int = Field(1883, ge=0, le=65535)
    max_connections: int = Field(1024, ge=1)

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, v: str) -> str:
        if not v.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must start with mqtts:// (or mqtt://)")
        return v


    @model_validator(mode="after")
    def _cluster(self) -> BrokerSpec:
        if self.kind == "mosquitto" and (self.nodes != 1 or self.cluster_hosts):
            raise ValueError("nodes/cluster_hosts need kind: nats (Mosquitto runs one node)")
        if self.cluster_hosts and len(self.cluster_hosts) != self.nodes:
            raise ValueError(f"{self.nodes} nodes but {len(self.cluster_hosts)} cluster_hosts")
        return self


class BundlesSpec(_Strict):
    out: Path = Path("bundles")
    proxy: Path | None = None
    proxy_sha256: str = ""
    proxy_url: str = ""
    client_cert: bool = False
    wheelhouse: Path | None = None
    platform: str | None = None
    python_version: str | None = None


class ServerSpec(_Strict):
    data_dir: Path = Field(Path("data"), description="where `koala data prepare --out` wrote proxy/test (under --out)")


class DeviceSpec(_Strict):
    id: str
    arch: str
    data: str | None = Field(None, description="the private-data .npz path on the device")
    ship_data: Path | None = Field(None, description="copy this local .npz into the bundle (demos)")

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        from server_app.provisioning.identity import check_device_id

        return check_device_id(v)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from server_app.zoo.archs import ARCHS

        if v not in ARCHS:
            raise ValueError(f"unknown architecture {v!r}; known: {', '.join(sorted(ARCHS))}")
        return v


class FleetManifest(_Strict):
    name: str = "koala-fleet"
    database: DatabaseSpec | None = None
    broker: BrokerSpec
    bundles: BundlesSpec = BundlesSpec()
    server: ServerSpec = ServerSpec()
    devices: list[DeviceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> FleetManifest:
        seen: set[str] = set()
        for d in self.devices:
            if d.id in seen:
                raise ValueError(f"device {d.id!r} is listed twice")
            if self.broker.kind == "nats" and "." in d.id:
                raise ValueError(f"device {d.id!r}: a '.' cannot be used on the NATS cluster broker")
            seen.add(d.id)
        return self


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "manifest"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {msg}{more}".replace("\n", " ")


def load_manifest(path: Path) -> FleetManifest:
    """Read and validate `path`; every problem is a one-line `ManifestError`."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ManifestError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ManifestError(f"{path}:{at} not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a mapping with broker, devices, ...")
    try:
        m = FleetManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path}: {_one_line(exc)}") from None
    base = path.resolve().parent
    inputs = {
        "proxy": m.bundles.proxy,
        "wheelhouse": m.bundles.wheelhouse,
    }
    resolved = {k: (base / v if v is not None else None) for k, v in inputs.items()}
    devices = [
        d.model_copy(update={"ship_data": base / d.ship_data}) if d.ship_data is not None else d
        for d in m.devices
    ]
    return m.model_copy(update={"bundles": m.bundles.model_copy(update=resolved), "devices": devices})
