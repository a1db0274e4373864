"""The SQL registry: devices, rounds, assignments, model versions, metrics, events.

Use: `reg = Registry(url); reg.upgrade(); reg.run(crud.create_round, strategy="koala_homo", ...)`.
"""

from __future__ import annotations

from .errors import Conflict, InvalidTransition, NotFound, RegistryError, RegistryUnavailable
from .retry import db_retry, with_db_retry
from .session import Registry, current_revision, head_revision, make_engine, upgrade_to_head

__all__ = [
    "Conflict",
    "InvalidTransition",
    "NotFound",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "current_revision",
    "db_retry",
    "head_revision",
    "make_engine",
    "upgrade_to_head",
    "with_db_retry",
]
