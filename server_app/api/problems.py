"""RFC 9457 problem details for every API error.

Why: a dashboard, a script and a person reading curl output should all get the same shape —
``{"type", "title", "status", "detail", "instance"}`` as ``application/problem+json`` — whether
the error came from auth (401/403), a missing row (404), a bad request (422), a state conflict
(409) or a database outage (503). Registry exceptions are mapped here so routes stay thin.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server_app.registry.errors import Conflict, InvalidTransition, NotFound, RegistryUnavailable

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("koala.api")


def problem(
    status: int, detail: str, *, request: Request | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {
        "type": f"https://koala-edge.dev/problems/{status}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _json_safe(errors: list[Any]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append({"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out


def install_problem_handlers(app: FastAPI) -> None:
    """Register the handlers on an app (called by create_app)."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), request=request, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _json_safe(list(exc.errors()))
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return problem(422, f"{where}: {first['msg']}" if where else str(first["msg"]), request=request, errors=errors)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return problem(404, f"{exc} not found", request=request)

    @app.exception_handler(InvalidTransition)
    async def _transition(request: Request, exc: InvalidTransition) -> JSONResponse:
        return problem(409, str(exc), request=request)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return problem(409, str(exc), request=request)

    @app.exception_handler(RegistryUnavailable)
    async def _unavailable(request: Request, exc: RegistryUnavailable) -> JSONResponse:
        log.warning("registry unavailable: %s", exc)
        return problem(503, "database unavailable, retry later", request=request, headers={"Retry-After": "5"})


# OpenAPI `responses=` fragments for routes.
def _doc(status: int, example: str) -> dict[str, Any]:
    return {
        "description": HTTPStatus(status).phrase,
        "content": {
            PROBLEM_JSON: {
                "example": {
                    "type": f"https://koala-edge.dev/problems/{status}",
                    "title": HTTPStatus(status).phrase,
                    "status": status,
                    "detail": example,
                }
            }
        },
    }


READ_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _doc(401, "missing bearer token (Authorization: Bearer <token>)"),
    403: _doc(403, "reads need a bearer token, but the server has none configured"),
    422: _doc(422, "query.limit: Input should be less than or equal to 1000"),
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _doc(401, "invalid bearer token"),
    403: _doc(403, "mutations are disabled: the server has no API token configured"),
    422: _doc(422, "body.quorum: Input should be greater than or equal to 1"),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _doc(404, "round 42 not found")}
CONFLICT: dict[int | str, dict[str, Any]] = {409: _doc(409, "a round is already running (round 7)")}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: _doc(503, "orchestrator not running")}
