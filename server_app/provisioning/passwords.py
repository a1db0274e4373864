"""Device secrets and the Mosquitto 2 password-file format.

Mosquitto 2.0 stores `user:$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512(password)>`
(64-byte digest, 12-byte salt; `mosquitto_passwd` uses 101 iterations). We compute it with hashlib
so the server can write the file without the `mosquitto_passwd` binary, and store the same string
as the device's credentials hash in the registry: the plain secret exists only in the device
bundle. Secrets are 256 random bits, so the low iteration count does not make them guessable,
and it keeps Mosquitto's per-connect verification cheap on its single thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

MOSQUITTO_ITERATIONS = 101
SALT_BYTES = 12


def new_secret() -> str:
    """A URL-safe random secret with 256 bits of entropy (no ':' so it never breaks a file)."""
    return secrets.token_urlsafe(32)


def mosquitto_hash(secret: str, *, iterations: int = MOSQUITTO_ITERATIONS, salt: bytes | None = None) -> str:
    """The `$7$...` hash Mosquitto 2 accepts in its `password_file`."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify(secret: str, stored: str) -> bool:
    """True if `secret` matches a `$7$` hash (constant-time compare)."""
    try:
        _, kind, iters, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if kind != "7":
        return False
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), base64.b64decode(salt_b64), int(iters))
    return hmac.compare_digest(digest, base64.b64decode(digest_b64))


def render_password_file(entries: Iterable[tuple[str, str]]) -> str:
    """`username:hash` lines, sorted so regenerating an unchanged fleet gives a stable diff."""
    lines = []
    for username, pw_hash in sorted(entries):
        if ":" in username or "\n" in username or not pw_hash.startswith("$7$"):
            raise ValueError(f"refusing to write password entry for {username!r}")
        lines.append(f"{username}:{pw_hash}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_secret_file(path: Path, secret: str) -> None:
    """Write a plain secret readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)
