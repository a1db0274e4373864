"""`with_db_retry`: retry a whole transaction while the database is unreachable.

Why a helper and not per-call retries: retrying one statement inside a broken transaction is wrong;
retrying the whole unit of work is right, and only for RegistryUnavailable (never for logic errors).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import RegistryUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)


def with_db_retry(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn() up to `attempts` times with exponential backoff on RegistryUnavailable; re-raise the last."""
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except RegistryUnavailable as exc:
            if attempt == attempts:
                raise
            log.warning("database unavailable (attempt %d/%d): %s; retrying in %.1fs", attempt, attempts, exc, delay)
            sleep(delay)
            delay = min(max_delay, delay * 2)
    raise AssertionError("unreachable")


def db_retry(**options: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form: @db_retry(attempts=3)."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> T:
            return with_db_retry(lambda: fn(*args, **kwargs), **options)

        return inner

    return wrap
