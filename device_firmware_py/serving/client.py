"""DeviceClient: the small Python API an application on the device uses to reach its agent.

    from device_firmware_py.serving.client import DeviceClient
    c = DeviceClient("/var/lib/koala/state/agent.sock")     # or DeviceClient(url="http://127.0.0.1:8765")
    classes = c.predict(x)                                 # x: float32 [N, H, W, C] or one [H, W, C]
    c.add_samples(x, y)                                    # labeled samples for the next rounds

Stdlib + numpy only (http.client over a Unix socket), so an application needs nothing the agent
does not already install. Arrays travel as .npy / .npz bodies (exact float32, no JSON parsing).
One keep-alive connection per client, reopened once after a broken one: use one client per thread.
Failures raise `DeviceClientError` with the agent's message (e.g. "label 12 out of range ...").
"""

from __future__ import annotations

import http.client
import io
import json
import socket
from typing import Any
from urllib.parse import urlsplit

import numpy as np


class DeviceClientError(RuntimeError):
    """The agent refused a request (status 4xx/5xx) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class DeviceClient:
    """Client of one agent's local endpoint: a Unix socket path, or `url="http://127.0.0.1:PORT"`."""

    def __init__(self, socket_path: str | None = None, *, url: str | None = None, timeout: float = 30.0):
        if bool(socket_path) == bool(url):
            raise ValueError("give exactly one of socket_path or url")
        self.socket_path, self.url, self.timeout = socket_path, url, timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.socket_path:
                self._conn = _UnixConnection(self.socket_path, self.timeout)
            else:
                u = urlsplit(self.url or "")
                if u.scheme != "http" or not u.hostname:
                    raise ValueError(f"url must be http://host:port, got {self.url!r}")
                self._conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> dict[str, Any]:
        """One request; the JSON answer, or DeviceClientError. A dropped keep-alive connection is
        reopened once (the agent restarted, or closed an idle connection)."""
        headers = {"Content-Type": ctype} if ctype else {}
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except (ConnectionRefusedError, FileNotFoundError) as exc:  # nobody listens there
                self.close()
                raise DeviceClientError(0, f"cannot reach the agent at {self.socket_path or self.url}: {exc}\n"
                                           "  is `koala-device run` running with serve = true?") from None  # fmt: skip
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as exc:
                self.close()
                if attempt == 2:
                    raise DeviceClientError(0, f"agent endpoint {self.socket_path or self.url} dropped the "
                                               f"connection: {exc}") from None  # fmt: skip
            except OSError as exc:  # e.g. a timeout
                self.close()
                raise DeviceClientError(0, f"agent at {self.socket_path or self.url}: {exc}") from None
        try:
            out = json.loads(data)
        except ValueError:
            raise DeviceClientError(resp.status, f"not a JSON answer: {data[:200]!r}") from None
        if resp.status >= 400:
            raise DeviceClientError(resp.status, str(out.get("error", out)))
        return out

    # ---------------------------------------------------------------- API
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/healthz")

    def model(self) -> dict[str, Any] | None:
        """The served model's info (kind, serial, round_id, bytes, sha256, ...), None before one exists."""
        return self.request("GET", "/v1/model")["model"]

    def predict_full(self, x: Any, logits: bool = True) -> dict[str, Any]:
        """The whole answer: {"classes", "logits" (if asked), "model": {kind, serial, round_id}}; with the
        agent's cascade on also "source" per row ("device" | "server") and "confidence"."""
        return self.request("POST", "/v1/predict" + ("?logits=1" if logits else ""), _npy(x), "application/x-npy")

    def predict(self, x: Any) -> np.ndarray:
        """Class indices [N] for inputs x (float32 [N, H, W, C] or one [H, W, C])."""
        return np.asarray(self.predict_full(x, logits=False)["classes"], np.int64)

    def predict_logits(self, x: Any) -> np.ndarray:
        return np.asarray(self.predict_full(x, logits=True)["logits"], np.float32)

    def add_samples(self, x: Any, y: Any) -> dict[str, Any]:
        """Give the agent labeled samples for its next rounds: {accepted, evicted, num_samples,
        label_histogram}. A bad batch (shape, dtype, label) raises and stores nothing."""
        buf = io.BytesIO()
        np.savez(buf, x=np.asarray(x), y=np.asarray(y))
        return self.request("POST", "/v1/samples", buf.getvalue(), "application/x-npz")

    def samples(self) -> dict[str, Any]:
        """The store's counts and label histogram."""
        return self.request("GET", "/v1/samples")


def _npy(x: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(x), allow_pickle=False)
    return buf.getvalue()
