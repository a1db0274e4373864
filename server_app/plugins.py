"""`module:attr` references of the policy (strategy, fusion rule, large-model factory) -> objects.

Its own module, importing nothing of the project, so that the engine, the models and the policy
can resolve a user's plug-in without importing each other (docs/extending.md)."""

from __future__ import annotations

import importlib
from typing import Any


class PluginError(ValueError):
    """A `module:attr` reference that cannot be loaded; the message names it and why."""


def load_ref(ref: str, what: str) -> Any:
    """`package.module:attr` -> the object."""
    mod_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{what} {ref!r} cannot be loaded: {exc}") from None
    return obj
