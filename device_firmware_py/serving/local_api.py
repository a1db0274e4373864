"""LocalApi: the agent's endpoint for applications on the same device (stdlib HTTP, no framework).

Transport: HTTP/1.1 on a Unix socket (default `<state_dir>/agent.sock`: who may connect is
decided by file permissions, 0660, and nothing on the network can reach it) and/or on
127.0.0.1:<serve_port> (loopback only: any local user can reach it). Stdlib `http.server` with one
thread per connection, `serve_max_concurrent` requests handled at once.

Routes (docs/device-serving.md):
  GET  /v1/healthz   {"ok", "model": bool, "num_samples"}
  GET  /v1/model     the served model's info (kind int8|float, serial, round_id, bytes, sha256, ...)
  POST /v1/predict   body: .npy (Content-Type application/x-npy) or JSON {"x": [...]};
                     -> {"classes": [...], "model": {...}} (+ "logits" with ?logits=1; with the
                     cascade on also "source" per row: "device" | "server", "confidence")
  POST /v1/samples   body: .npz with x and y (application/x-npz) or JSON {"x": [...], "y": [...]};
                     -> {"accepted", "evicted", "num_samples", "label_histogram"}
  GET  /v1/samples   the store's counts and label histogram (never the samples themselves)
Errors are JSON {"error": "<what is wrong>"} with 400 (bad body / shape / dtype / label), 404, 405,
409 (samples sent to a device that trains on a data file), 411/413 (no length / too large: refused
before the body is read), 503 (no model yet, or busy).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from device_firmware_py.serving.predictor import NoModel, Predictor
from device_firmware_py.serving.sample_store import SampleError, SampleStore

log = logging.getLogger("koala.device.serve")
NPY, NPZ, JSON = "application/x-npy", "application/x-npz", "application/json"
BUSY_WAIT_S = 5.0
DRAIN_BYTES = 64 << 20  # an oversized body up to this size is read and dropped, larger: connection closed


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class _TcpHTTPServer(ThreadingHTTPServer):
    daemon_threads = True


class LocalApi:
    """Serves `predictor` (and `store`, when the device trains on it) until `stop()`.

    `on_samples(result)` runs after every accepted add (the agent re-announces its sample count);
    `extra_health()` adds fields to /v1/healthz."""

    def __init__(self, predictor: Predictor, store: SampleStore | None = None, *, socket_path: str = "", port: int = 0,
                 max_request_bytes: int = 4 << 20, max_concurrent: int = 4,
                 on_samples: Callable[[dict[str, Any]], None] | None = None,
                 max_batch: int | None = None, cascade: Any = None):  # fmt: skip
        self.predictor, self.store = predictor, store
        self.socket_path, self.port = socket_path, port
        self.max_request_bytes = max_request_bytes
        self.on_samples = on_samples
        self.max_batch = max_batch
        self.cascade = cascade  # serving.cascade.Cascade when the device owner turned the cascade on, else None
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.requests = 0
        self.errors = 0  # 5xx answers (4xx are the caller's mistakes)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> LocalApi:
        handler = _handler_for(self)
        if self.socket_path:
            path = Path(self.socket_path)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new directory: this user's only
            if path.exists() or path.is_symlink():
                _remove_stale_socket(path)
            srv: socketserver.BaseServer = _UnixHTTPServer(str(path), handler)
            os.chmod(path, 0o660)
            self._servers.append(srv)
        if self.port:
            self._servers.append(_TcpHTTPServer(("127.0.0.1", self.port), handler))
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name="koala-serve", daemon=True)
            t.start()
            self._threads.append(t)
        if self._servers:
            log.info("serving socket=%s port=%s", self.socket_path or "-", self.bound_port or "-")
        return self

    @property
    def bound_port(self) -> int:
        for srv in self._servers:
            if isinstance(srv, _TcpHTTPServer):
                return int(srv.server_address[1])
        return 0

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(5)
        if self.socket_path:
            Path(self.socket_path).unlink(missing_ok=True)
        self._servers, self._threads = [], []

    # --------------------------------------------------------------- routes
    def handle(self, method: str, target: str, ctype: str, body: bytes | None) -> tuple[int, dict[str, Any]]:
        url = urlsplit(target)
        route, query = url.path.rstrip("/"), parse_qs(url.query)
        routes = {"/v1/healthz": ("GET",), "/v1/model": ("GET",), "/v1/predict": ("POST",), "/v1/samples": ("GET", "POST")}
        if route not in routes:
            raise ApiError(404, f"no route {url.path}; routes: {', '.join(sorted(routes))}")
        if method not in routes[route]:
            raise ApiError(405, f"{method} {route} is not allowed; use {' or '.join(routes[route])}")
        if route == "/v1/healthz":
            m = self.predictor.current
            out: dict[str, Any] = {"ok": True, "model": m is not None, "num_samples": len(self.store) if self.store is not None else None}
            if self.cascade is not None:
                out["cascade"] = self.cascade.info()
            return 200, out
        if route == "/v1/model":
            m = self.predictor.current
            return 200, {"model": None if m is None else m.info.as_dict()}
        if route == "/v1/predict":
            x = _read_x(ctype, body or b"")
            try:
                classes, logits, info = self.predictor.predict(x)
            except NoModel as exc:
                raise ApiError(503, f"{exc}: retry after the agent has loaded its model") from None
            except SampleError as exc:
                raise ApiError(400, str(exc)) from None
            out = {"classes": classes.tolist(), "model": {"kind": info.kind, "serial": info.serial,
                                                                          "round_id": info.round_id}}  # fmt: skip
            if self.cascade is not None:  # opt-in: unsure rows go to the server's large model
                xb = np.asarray(x, np.float32).reshape(len(logits), *info.input_shape)
                c = self.cascade.apply(xb, logits)
                out.update(classes=c.classes.tolist(), source=c.source,
                           confidence=[round(float(v), 4) for v in c.confidence])  # fmt: skip
                if c.server_model_version is not None:
                    out["server_model_version"] = c.server_model_version
                if c.fallback is not None:
                    out["cascade_fallback"] = c.fallback
            if query.get("logits", ["0"])[0] not in ("0", "false", ""):
                out["logits"] = logits.tolist()
            return 200, out
        # /v1/samples
        if self.store is None:
            raise ApiError(409, "this device trains on its data file (data_source = file): "
                                "set data_source = store in the device config to accept samples")  # fmt: skip
        if method == "GET":
            return 200, self.store.stats()
        x, y = _read_xy(ctype, body or b"")
        try:
            res = self.store.add(x, y, max_batch=self.max_batch)
        except SampleError as exc:
            raise ApiError(400, f"samples refused, nothing stored: {exc}") from None
        if self.on_samples is not None:
            try:
                self.on_samples(res)
            except Exception:  # the callback is advisory (status re-announce); the samples are stored
                log.warning("on_samples callback failed", exc_info=True)
        return 200, res


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file no live agent answers on; refuse to replace anything else."""
    import stat

    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise OSError(f"{path} exists and is not a socket: refusing to replace it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: left by a killed agent
        return
    finally:
        s.close()
    raise OSError(f"another process serves on {path} (a second agent with the same state_dir?)")


def _kind(ctype: str) -> str:
    c = ctype.split(";")[0].strip().lower()
    if c in (NPY, NPZ, JSON):
        return c
    if c in ("", "application/octet-stream"):
        return "binary"
    raise ApiError(400, f"Content-Type {c!r} not understood: send {NPY}, {NPZ} or {JSON}")


def _load_binary(body: bytes) -> Any:
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ApiError(400, f"body is not a .npy / .npz file ({exc})") from None


def _read_json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"body is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "JSON body must be an object with key x (and y for samples)")
    return obj


def _json_array(obj: dict[str, Any], key: str, dtype: Any) -> np.ndarray:
    if key not in obj:
        raise ApiError(400, f"JSON body has no {key!r}")
    try:
        return np.asarray(obj[key], dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f"{key} is not a numeric (rectangular) array: {exc}") from None


def _read_x(ctype: str, body: bytes) -> np.ndarray:
    kind = _kind(ctype)
    if kind == JSON:
        return _json_array(_read_json(body), "x", np.float32)  # JSON has no dtypes: numbers are inputs
    got = _load_binary(body)
    if isinstance(got, np.lib.npyio.NpzFile):
        with got:
            if "x" not in got.files:
                raise ApiError(400, f".npz body has no array x (has {got.files})")
            return np.asarray(got["x"])
    return np.asarray(got)


def _read_xy(ctype: str, body: bytes) -> tuple[np.ndarray, np.ndarray]:
    kind = _kind(ctype)
    if kind == JSON:
        obj = _read_json(body)
        y = _json_array(obj, "y", None)
        return _json_array(obj, "x", np.float32), y
    got = _load_binary(body)
    if not isinstance(got, np.lib.npyio.NpzFile):
        raise ApiError(400, "samples need labels: send a .npz with arrays x and y (or JSON {\"x\", \"y\"})")
    with got:
        missing = [k for k in ("x", "y") if k not in got.files]
        if missing:
            raise ApiError(400, f".npz body lacks {missing} (has {got.files})")
        return np.asarray(got["x"]), np.asarray(got["y"])


def _handler_for(api: LocalApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "koala-device"
        timeout = 30  # a client that stops mid-request frees its thread

        def address_string(self) -> str:  # Unix sockets have no client address
            return "local"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            api.requests += 1
            body: bytes | None = None
            try:
                if method in ("POST", "PUT"):
                    body = self._body()
                if not api._slots.acquire(timeout=BUSY_WAIT_S):
                    raise ApiError(503, "busy: too many requests at once, retry")
                try:
                    status, out = api.handle(method, self.path, self.headers.get("Content-Type", ""), body)
                finally:
                    api._slots.release()
            except ApiError as exc:
                status, out = exc.status, {"error": exc.message}
            except Exception as exc:  # a bug must answer 500, not kill the connection silently
                log.exception("request failed path=%s", self.path)
                status, out = 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}
            if status >= 500:
                api.errors += 1
            self._reply(status, out)

        def _body(self) -> bytes:
            raw = self.headers.get("Content-Length")
            if raw is None:
                self.close_connection = True
                raise ApiError(411, "Content-Length required")
            try:
                n = int(raw)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, f"bad Content-Length {raw!r}") from None
            if n < 0 or n > api.max_request_bytes:
                # Read and drop a body of up to DRAIN_BYTES in small chunks (memory stays bounded) so
                # the client, still sending, gets the 413 instead of a broken pipe; past that, hang up.
                if 0 <= n <= DRAIN_BYTES:
                    left = n
                    while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                        left -= len(chunk)
                else:
                    self.close_connection = True
                raise ApiError(413, f"request body of {n} bytes is over the limit of {api.max_request_bytes} "
                                    "(serve_max_request_bytes): send fewer rows per request")  # fmt: skip
            return self.rfile.read(n)

        def _reply(self, status: int, out: dict[str, Any]) -> None:
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", JSON)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

    return Handler
