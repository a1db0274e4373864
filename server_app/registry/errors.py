"""Registry error types: callers distinguish "the database is down, retry" from "this is wrong"."""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every registry error."""


class RegistryUnavailable(RegistryError):
    """The database cannot be reached or is locked/busy: transient, retry the whole transaction."""


class NotFound(RegistryError):
    """A row the caller named does not exist (device, round, assignment)."""


class InvalidTransition(RegistryError):
    """A round state change the state machine does not allow (e.g. completed -> collecting)."""


class Conflict(RegistryError):
    """A uniqueness rule was violated in a way idempotency cannot absorb."""
