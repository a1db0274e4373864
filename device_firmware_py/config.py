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
    data_path: str  # .npz with x [N,H,W,C] float32 and y [N] int (memory-mapped via a cache in state_dir)
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
    client_id: str = ""  # default: "koala-dev-{device_id}"
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
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
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
        return self.client_id or f"koala-dev-{self.device_id}"

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
        missing = [n for n, f in kinds.items() if f.default is MISSING and f.default_factory is MISSING and n not in values]
        if missing:
            raise ConfigError(f"missing device config keys: {missing}")
        for name, f in kinds.items():
            if name in values and isinstance(values[name], str) and f.type != "str":
                values[name] = _coerce(name, f.type, values[name])
        cfg = cls(**values)
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

    def check_files(self) -> None:
        """Data files exist and the proxy file is the one the server uses (sha256)."""
        for p in (self.data_path, self.proxy_path):
            if not Path(p).is_file():
                raise ConfigError(f"file not found: {p}")
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
