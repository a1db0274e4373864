"""Server configuration: one pydantic-settings `Settings`, from a config file and `KOALA_*` env vars.

Why one object: the CLI, the API, the orchestrator and tests get their settings injected from here,
never from globals. Precedence (highest first): keyword arguments, environment (`KOALA_` prefix,
nested with `__`, e.g. `KOALA_BROKER__URL`, `KOALA_POLICY__LOCAL_EPOCHS`), the config file
(`--config FILE` or `KOALA_CONFIG`; .toml, .yaml/.yml or .json), defaults.
A bad value fails at load time with a `ConfigError` that names the field and where to set it.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from server_app.ingest_budget import Budgets as _B
from server_app.intake_watchdog import INTERVAL_S as WATCHDOG_INTERVAL_S
from server_app.intake_watchdog import STALL_S as WATCHDOG_STALL_S
from server_app.policy import KoalaPolicy

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("koala_config_file", default=None)


class ConfigError(ValueError):
    """Configuration is invalid; the message lists every bad field and how to set it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _read_secret_file(path: Path, field: str) -> str:
    """A secret kept in a file (a systemd credential, a provisioning output), stripped; never empty."""
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{field} {path}: {exc.strerror or exc}") from None
    if not secret:
        raise ValueError(f"{field} {path} is empty")
    return secret


class BrokerSettings(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    # or read it from this file (`koala provision` writes broker/secrets/koala-server.password;
    # systemd passes it as a credential): settings files then hold no secret
    password_file: Path | None = None
    client_id: str = "koala-server"
    keepalive: int = Field(30, ge=5, le=3600)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    # `$share/{group}/...` for results/progress so several server workers split ingestion. None
    # (default) = probe the broker at start: shared group `koala-server` where `$share` works,
    # plain subscriptions where it does not (amqtt SUBACKs `$share` but silently delivers nothing).
    shared_group: str | None = None
    # `koala provision` output directory (dynamic-security file, admin credential): with it, a REST
    # revoke also deletes the device's broker account live (its session is dropped in milliseconds).
    provision_dir: Path | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        u = urlsplit(v)
        try:
            port = u.port
        except ValueError:
            port = -1
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname or port == -1:
            raise ValueError(f"must look like mqtt://host[:port] or mqtts://host[:port], got {v!r}")
        return v

    @field_validator("client_id", "shared_group")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.fullmatch(v):
            raise ValueError(f"{v!r} must be 1-64 characters of [A-Za-z0-9_.-] (it goes into MQTT ids/topics)")
        return v

    @field_validator("protocol", mode="before")
    @classmethod
    def _proto(cls, v: Any) -> Any:
        return {"311": "3.1.1", "3": "3.1.1", "v5": "5", "5.0": "5"}.get(str(v), str(v)) if v is not None else v

    @model_validator(mode="after")
    def _tls_pair(self) -> BrokerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @model_validator(mode="after")
    def _read_password_file(self) -> BrokerSettings:
        if self.password is None and self.password_file is not None:
            self.password = SecretStr(_read_secret_file(self.password_file, "password_file"))
        return self

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://") or self.tls_ca is not None


class DatabaseSettings(_Section):
    url: str = "sqlite:///./koala.db"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            backend = make_url(v).get_backend_name()
        except ArgumentError:
            raise ValueError(f"not a database URL: {v!r} (try sqlite:///./koala.db or postgresql+psycopg://user@host/db)") from None
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"backend {backend!r} is not supported; use sqlite or postgresql")
        return v


class PathSettings(_Section):
    data_dir: Path = Path("./koala_data")  # datasets, partitions, proxy/test sets
    proxy_path: Path | None = None  # default: data_dir/proxy.npz
    test_path: Path | None = None  # default: data_dir/test.npz
    proxy_labels_path: Path | None = None  # default: data_dir/proxy_labels.npz (optional file)
    artifacts_dir: Path = Path("./koala_artifacts")  # large-model checkpoints, exported small models
    run_dir: Path = Path("./runs")  # simulation / experiment outputs

    @property
    def proxy(self) -> Path:
        return self.proxy_path or self.data_dir / "proxy.npz"

    @property
    def test(self) -> Path:
        return self.test_path or self.data_dir / "test.npz"

    @property
    def proxy_labels(self) -> Path:
        return self.proxy_labels_path or self.data_dir / "proxy_labels.npz"


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None  # or read the token from this file (0600; settings hold no secret)
    open_reads_localhost: bool = False  # GETs from 127.0.0.1/::1 need no token (dashboard on the box)

    @model_validator(mode="after")
    def _read_token_file(self) -> ApiSettings:
        if self.bearer_token is None and self.bearer_token_file is not None:
            self.bearer_token = SecretStr(_read_secret_file(self.bearer_token_file, "bearer_token_file"))
        return self


class IngestSettings(_Section):
    """Per-device message budgets (server_app.ingest_budget; published in asyncapi.yaml) and the
    intake watchdog (server_app.intake_watchdog). Over-budget messages are dropped before decoding."""

    # defaults: the measured ones of Budgets and the watchdog, not copies of their numbers
    results_per_round: int = Field(_B.results_per_round, ge=1, le=1000)
    progress_per_s: float = Field(_B.progress_per_s, gt=0)
    progress_burst: int = Field(_B.progress_burst, ge=1)
    status_per_s: float = Field(_B.status_per_s, gt=0)
    status_burst: int = Field(_B.status_burst, ge=1)
    predict_per_s: float = Field(_B.predict_per_s, gt=0)  # cascade predict requests per device (devices/<id>/up/predict)
    predict_burst: int = Field(_B.predict_burst, ge=1)
    event_window_s: float = Field(_B.event_window_s, gt=0)
    quarantine_after: int = Field(_B.quarantine_after, ge=0)  # drops in one window that shut a device out at the broker (0: never)
    quarantine_s: float = Field(_B.quarantine_s, gt=0)
    watchdog_interval_s: float = Field(WATCHDOG_INTERVAL_S, gt=0)
    watchdog_stall_s: float = Field(WATCHDOG_STALL_S, gt=0)

    def budgets(self) -> _B:
        """The section's budget fields as server_app.ingest_budget.Budgets."""
        return _B(**{k: getattr(self, k) for k in _B.__dataclass_fields__})


class Settings(BaseSettings):
    """The server's whole configuration (see module docstring for precedence)."""

    model_config = SettingsConfigDict(
        env_prefix="KOALA_", env_nested_delimiter="__", extra="forbid", validate_default=True, populate_by_name=True
    )

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    policy: KoalaPolicy = Field(default_factory=KoalaPolicy)  # the ONE policy (server_app.policy), also koala sim's
    api: ApiSettings = Field(default_factory=ApiSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line for log shippers
    # torch device of the large model (reverse KD, evaluation): cpu | cuda | cuda:N | auto (cuda when
    # present). Checked for form here; that the GPU exists is checked when the server starts.
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$")
    # What this process does when the server is split over processes (docs/scale-out.md): all (one
    # process, the default) | orchestrator | ingest | api. worker_id: an ingestion worker's stable
    # name (persistent MQTT session; give each worker its own and restart it under a supervisor).
    role: Literal["all", "orchestrator", "ingest", "api"] = "all"
    worker_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,48}$")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _worker_id_needs_ingest(self) -> Settings:
        if self.worker_id is not None and self.role != "ingest":
            raise ValueError(f"worker_id names an ingestion worker; role is {self.role!r} (set role = 'ingest')")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, _LegacyEnv(settings_cls)]
        path = _CONFIG_FILE.get() or (Path(os.environ["KOALA_CONFIG"]) if os.environ.get("KOALA_CONFIG") else None)
        if path is not None:
            sources.append(_file_source(settings_cls, path))
        return tuple(sources)

    # Flat read-only aliases: the names other modules duck-type on (server_app.services, api.auth).
    @property
    def broker_url(self) -> str:
        return self.broker.url

    @property
    def database_url(self) -> str:
        return self.database.url

    @property
    def db_url(self) -> str:
        return self.database_url

    @property
    def data_dir(self) -> str:
        return str(self.paths.data_dir)

    @property
    def api_token(self) -> SecretStr | None:
        return self.api.bearer_token

    @property
    def open_reads_localhost(self) -> bool:
        return self.api.open_reads_localhost

    def redacted(self) -> dict[str, Any]:
        """For logs and `koala ... --print-config`: secrets shown as '**********'."""
        return self.model_dump(mode="json", by_alias=False)


class _LegacyEnv(PydanticBaseSettingsSource):
    """`KOALA_DATABASE_URL` / `KOALA_BROKER_URL` (single underscore) as commonly written in deploy files."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if os.environ.get("KOALA_DATABASE_URL") and not os.environ.get("KOALA_DATABASE__URL"):
            out["database"] = {"url": os.environ["KOALA_DATABASE_URL"]}
        if os.environ.get("KOALA_BROKER_URL") and not os.environ.get("KOALA_BROKER__URL"):
            out["broker"] = {"url": os.environ["KOALA_BROKER_URL"]}
        return out


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (given by --config or KOALA_CONFIG)")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    raise ConfigError(f"config file {path}: unknown format {suffix!r}; use .toml, .yaml/.yml or .json")


def _env_name(loc: tuple[Any, ...]) -> str:
    return "KOALA_" + "__".join(str(p).upper() for p in loc if not isinstance(p, int))


def format_validation_error(err: ValidationError, path: Path | None) -> str:
    lines = [f"invalid KOALA configuration{f' (file {path})' if path else ''}:"]
    for e in err.errors():
        loc = tuple(e.get("loc", ()))
        dotted = ".".join(str(p) for p in loc) or "(root)"
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown setting (typo?)"
        lines.append(f"  {dotted}: {msg}  [env {_env_name(loc)}]")
    return "\n".join(lines)


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from `config` (else KOALA_CONFIG), env and overrides; ConfigError on bad input."""
    path = Path(config) if config else (Path(os.environ["KOALA_CONFIG"]) if os.environ.get("KOALA_CONFIG") else None)
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, path)) from None
    except (OSError, ValueError) as err:  # unreadable / unparsable file
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    finally:
        _CONFIG_FILE.reset(token)
