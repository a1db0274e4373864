"""Bearer-token access control of the REST API.

Rules (one shared secret; the server is an operator tool, not a multi-tenant service):
- **Mutations** (start/stop a round, revoke a device, change the schedule) always need
  ``Authorization: Bearer <token>``. With no token configured they are refused with 403:
  a server without a secret must not be steerable by whoever reaches its port.
- **Reads** need the token too, unless ``open_reads_localhost`` is set *and* the TCP peer is a
  loopback address (the dashboard on the same machine, ``curl localhost``). Behind a reverse
  proxy every request looks local, so leave it off there.

Status codes: 401 (with ``WWW-Authenticate: Bearer``) when the token is missing or wrong,
403 when mutations are disabled because no token is configured.
The comparison is constant-time (``hmac.compare_digest``) so response timing leaks nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# Declares the scheme in the OpenAPI document (components.securitySchemes + each guarded route's
# `security`), so /docs shows an Authorize button. auto_error=False: the checks below decide.
bearer_scheme = HTTPBearer(
    scheme_name="bearer", auto_error=False,
    description="The server's API token (KOALA_API__BEARER_TOKEN / api.bearer_token; a demo saves it as "
    "<run dir>/api_token). Reads from the server's own machine need none when open_reads_localhost is set.",
)  # fmt: skip
BearerDoc = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


@dataclass(frozen=True)
class AuthConfig:
    token: str | None = None
    open_reads_localhost: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> AuthConfig:
        """Read the token and the localhost switch from server Settings (duck-typed: plain str or
        pydantic SecretStr; several field spellings accepted while Settings settles)."""
        if settings is None:
            return cls()
        raw = None
        for name in ("api_token", "api_bearer_token", "bearer_token", "token"):
            raw = getattr(settings, name, None)
            if raw is not None:
                break
        if raw is not None and hasattr(raw, "get_secret_value"):
            raw = raw.get_secret_value()
        token = str(raw) if raw else None
        return cls(token=token, open_reads_localhost=bool(getattr(settings, "open_reads_localhost", False)))


def auth_config(request: Request) -> AuthConfig:
    """The app's AuthConfig: set explicitly on app.state.auth, else derived from the services' Settings."""
    cfg = getattr(request.app.state, "auth", None)
    if isinstance(cfg, AuthConfig):
        return cfg
    services = getattr(request.app.state, "services", None)
    cfg = AuthConfig.from_settings(getattr(services, "settings", None))
    request.app.state.auth = cfg
    return cfg


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _unauthorized(detail: str, error: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": f'Bearer realm="koala", error="{error}"'},
    )


def _check_token(cfg: AuthConfig, request: Request) -> None:
    given = _bearer(request)
    if given is None:
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)", "invalid_request")
    if cfg.token is None or not hmac.compare_digest(given.encode(), cfg.token.encode()):
        raise _unauthorized("invalid bearer token", "invalid_token")


def require_read(request: Request, _bearer_doc: BearerDoc = None) -> None:
    """Dependency of every read endpoint."""
    cfg = auth_config(request)
    if cfg.open_reads_localhost and is_loopback(request.client.host if request.client else None):
        return
    if cfg.token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="reads need a bearer token, but the server has none configured (set KOALA_API__BEARER_TOKEN "
            "or enable open_reads_localhost)",
        )
    _check_token(cfg, request)


def require_write(request: Request, _bearer_doc: BearerDoc = None) -> None:
    """Dependency of every mutating endpoint."""
    cfg = auth_config(request)
    if cfg.token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="mutations are disabled: the server has no API token configured (set KOALA_API__BEARER_TOKEN or api.bearer_token)",
        )
    _check_token(cfg, request)


def require_token(request: Request, _bearer_doc: BearerDoc = None) -> None:
    """Dependency of routes that always need the token, also from loopback (POST /predict: inputs are
    data and a forward pass costs the server CPU)."""
    cfg = auth_config(request)
    if cfg.token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="this route needs a bearer token, but the server has none configured (set KOALA_API__BEARER_TOKEN "
            "or api.bearer_token)",
        )
    _check_token(cfg, request)
