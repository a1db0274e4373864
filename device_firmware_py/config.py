"""DeviceConfig: everything one device agent needs, from a JSON/TOML file plus `KOALA_DEVICE_*` env.

Why a stdlib dataclass and not pydantic: the device install is numpy + paho + LiteRT only (a
Raspberry-Pi-class target); the server's pydantic Settings must not leak onto it. Precedence:
defaults < file < environment (so a provisioning bundle's file can be overridden per host, e.g.
`KOALA_DEVICE_BROKER_URL=mqtt://10.0.0.2:1883`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from device_firmware_py.mqtt import parse_broker_url

ENV_PREFIX = "KOALA_DEVICE_"


class ConfigError(ValueError):
    """The device config is missing a field, has a wrong type, or points at a bad file."""


@dataclass
class DeviceConfig:
    device_id: str
    data_path: str  # .npz with x [N,H,W,C] float32 and y [N] int (memory-mapped via a cache in state_dir); data_source=file
    proxy_path: str  # .npz with x [P,H,W,C] float32, or .npy of x: the unlabeled proxy inputs (same as the server's)
    state_dir: str  # model weights, round state, int8 model: survives restarts
    arch: str = "cnn_small"
    test_path: str = ""  # optional labeled .npz (x, y) the device reports its held-out accuracy on
    proxy_sha256: str = ""  # sha256 of the proxy file; checked on start when set
    broker_url: str = "mqtt://127.0.0.1:1883"  # mqtt://host:port or mqtts://host:port
    username: str = ""
    password: str = ""
    password_file: str = ""  # read the password from a file (provisioning bundles)
    ca_file: str = ""  # TLS CA for mqtts://
    client_id: str = ""  # default: contract.topics.device_client_id ("koala-dev-{device_id}"); a hardened broker accepts only that
    keepalive_s: int = 15
    num_threads: int = 1
    quantize: bool = True  # re-quantize the int8 inference model after each round
    quantize_isolated: bool = True  # ...in a short-lived child process (its memory peak is not the agent's)
    # free the training interpreter while the quantizer child runs (a small-memory device class: their
    # peaks do not add up; Adam moments restart each round, as after a device restart)
    release_before_quantize: bool = False
    # one training phase's LiteRT interpreter at a time (SmallModel(low_memory=True)): forward KD,
    # local training and logits each get a fresh interpreter, the weights and Adam state carried in
    # numpy, so the peak is the largest activation arena, not their sum; bit-identical weights
    low_memory: bool = False
    # XNNPACK for the training model (the default delegates); False: builtin kernels only, whose
    # arenas are smaller (mobilenet_tiny train ~43 vs ~51 MiB) and steps ~2.5x slower; the weights
    # differ from an XNNPACK run in the last float bits
    xnnpack: bool = True
    progress_interval_s: float = 1.0  # progress messages during training: at most one per interval
    calibration_samples: int = 128
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one object per line, for journald/log shippers)
    # ---- data born on the device (docs/device-serving.md) -------------------------------------
    # "file": train on `data_path` (a .npz `koala data prepare` cut: demos, simulation);
    # "store": train on the bounded on-device sample store the device's application fills through
    # the local endpoint / the spool directory (`data_path` may then be left out or "").
    data_source: str = "file"
    store_max_samples: int = 2000  # the store keeps the newest N samples...
    store_max_per_class: int = 1000  # ...and at most this many of one class (0: no per-class cap)
    spool_dir: str = ""  # "": no spool; else .npz files (x, y) dropped here are taken into the store
    spool_poll_s: float = 2.0  # how often the agent looks into spool_dir
    spool_keep: int = 100  # files kept in spool_dir/accepted and spool_dir/rejected (oldest deleted)
    # ---- inference for applications on the device -------------------------------------------------
    serve: bool = True  # serve the current model on a local endpoint (HTTP on a Unix socket / loopback)
    serve_socket: str = ""  # Unix socket path; "": <state_dir>/agent.sock; "off": no socket
    serve_port: int = 0  # > 0: also listen on 127.0.0.1:<port> (any local user can reach it then)
    serve_max_request_bytes: int = 4 << 20  # larger bodies are refused (413) before they are read
    serve_max_concurrent: int = 4  # requests handled at once; more wait, past 5 s they get 503
    # ---- edge-cloud cascade (docs/device-serving.md "Cascade"): OFF by default because it SENDS INPUTS
    # TO THE SERVER. On: a predict input whose top softmax probability under the device's model is below
    # cascade_threshold goes to the server's large model over the device's MQTT topics (up/predict);
    # the device answers with the server's class, or its own after cascade_timeout_s. Never training samples.
    cascade: bool = False
    cascade_threshold: float = 0.7
    cascade_timeout_s: float = 2.0
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def socket_path(self) -> str:
        """The Unix socket the agent serves on ("" when none): `serve_socket`, or the state dir's."""
        if not self.serve or self.serve_socket == "off":
            return ""
        if self.serve_socket:
            return self.serve_socket
        default = Path(self.state_dir).absolute() / "agent.sock"
        if len(os.fsencode(str(default))) <= 107:
            return str(default)
        # a deep state dir would make the default longer than a Unix socket path may be: a short
        # per-user path instead (docs/device-serving.md), stable for this state dir
        import tempfile

        tag = hashlib.sha256(os.fsencode(str(default))).hexdigest()[:12]
        return str(Path(tempfile.gettempdir()) / f"koala-{os.getuid()}" / f"{self.device_id[:32]}-{tag}.sock")

    @property
    def host(self) -> str:
        return parse_broker_url(self.broker_url).host

    @property
    def port(self) -> int:
        return parse_broker_url(self.broker_url).port

    @property
    def tls(self) -> bool:
        return parse_broker_url(self.broker_url).tls

    @property
    def mqtt_client_id(self) -> str:
        from device_firmware_py.contract.topics import device_client_id

        return self.client_id or device_client_id(self.device_id)

    def secret(self) -> str:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None) -> DeviceConfig:
        """File (JSON or TOML by suffix) then `KOALA_DEVICE_<FIELD>` env overrides; validated."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(_read_file(Path(path)))
        env = dict(os.environ if env is None else env)
        kinds = {f.name: f for f in fields(cls)}
        for name, f in kinds.items():
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = _coerce(name, f.type, env[key])
        unknown = set(values) - set(kinds)
        if unknown:
            raise ConfigError(f"unknown device config keys: {sorted(unknown)}")
        if values.get("data_source") == "store":  # trains on what the application feeds it: no data file
            values.setdefault("data_path", "")
        missing = [n for n, f in kinds.items() if f.default is MISSING and f.default_factory is MISSING and n not in values]
        if missing:
            raise ConfigError(f"missing device config keys: {missing}")
        for name, f in kinds.items():
            if name in values and isinstance(values[name], str) and f.type != "str":
                values[name] = _coerce(name, f.type, values[name])
        cfg = cls(**values)
        cfg.source = str(path) if path is not None else "KOALA_DEVICE_* env"  # type: ignore[attr-defined]  # named by file errors
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from device_firmware_py.contract.topics import validate_device_id

        try:
            validate_device_id(self.device_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            parse_broker_url(self.broker_url)
        except ValueError:
            raise ConfigError(f"broker_url must be mqtt://host:port or mqtts://host:port, got {self.broker_url!r}") from None
        if self.progress_interval_s < 0:
            raise ConfigError("progress_interval_s must be >= 0")
        if self.num_threads < 1 or self.keepalive_s < 1:
            raise ConfigError("num_threads and keepalive_s must be >= 1")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        if self.data_source not in ("file", "store"):
            raise ConfigError(f"data_source must be file or store, got {self.data_source!r}")
        if self.data_source == "file" and not self.data_path:
            raise ConfigError("data_path is required with data_source = file (or set data_source = store)")
        if self.store_max_samples < 1 or self.store_max_per_class < 0:
            raise ConfigError("store_max_samples must be >= 1 and store_max_per_class >= 0")
        if self.spool_poll_s <= 0 or self.spool_keep < 0:
            raise ConfigError("spool_poll_s must be > 0 and spool_keep >= 0")
        if not 0 <= self.serve_port <= 65535:
            raise ConfigError(f"serve_port must be 0 (off) or a port, got {self.serve_port}")
        if self.serve_max_request_bytes < 1024 or self.serve_max_concurrent < 1:
            raise ConfigError("serve_max_request_bytes must be >= 1024 and serve_max_concurrent >= 1")
        if not 0.0 <= self.cascade_threshold <= 1.0 or self.cascade_timeout_s <= 0:
            raise ConfigError("cascade_threshold must be in [0, 1] and cascade_timeout_s > 0")
        sock = self.socket_path
        if len(os.fsencode(sock)) > 107:  # sun_path holds 108 bytes with its NUL
            raise ConfigError(f"serve_socket path is {len(os.fsencode(sock))} bytes, a Unix socket path must be <= 107: "
                              "set serve_socket to a shorter path (e.g. /run/koala/agent.sock)")

    def check_files(self) -> None:
        """The files the config names exist (CA, password file, data, proxy; each error names its key
        and the config file) and the proxy file is the one the server uses (sha256)."""
        where = getattr(self, "source", "") or "the device config"
        keys = ["ca_file", "password_file"] + (["data_path"] if self.data_source == "file" else []) + ["proxy_path"]
        for key in keys:
            p = getattr(self, key)
            if (p or key in ("data_path", "proxy_path")) and not Path(p).is_file():
                what = {"ca_file": "CA file", "password_file": "password file"}.get(key, "file")
                raise ConfigError(f"{what} {p} not found ({key} in {where})")
        if self.proxy_sha256:
            got = file_sha256(self.proxy_path)
            if got != self.proxy_sha256:
                raise ConfigError(f"proxy file {self.proxy_path} sha256 {got[:12]} != configured {self.proxy_sha256[:12]}")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"device config not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be an object/table")
    return data.get("device", data) if isinstance(data.get("device"), dict) else data


def _coerce(name: str, typ: Any, raw: str) -> Any:
    t = str(typ)
    try:
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t.startswith("dict"):
            return json.loads(raw)
    except ValueError:
        raise ConfigError(f"{name}: cannot read {raw!r} as {t}") from None
    return raw
