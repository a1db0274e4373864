"""One file per algorithm; `build_strategy(policy, ...)` is THE way to make one.

`koala sim`, `koala demo` and `koala serve` all call it with a `server_app.policy.KoalaPolicy`,
so a setting means the same thing everywhere. A policy's `strategy` is a built-in name or a
`module:attr` reference to a user's Strategy subclass (the extension point, see
docs/extending.md); a `fusion` of the form `module:attr` plugs in a user's fusion rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from server_app import plugins
from server_app.engine.strategies.fedavg_large import FedAvgLarge
from server_app.engine.strategies.fedavg_small import FedAvgSmall
from server_app.engine.strategies.koala import KoalaStrategy
from server_app.engine.strategies.koala_hetero import KoalaHetero
from server_app.engine.strategies.koala_homo import KoalaHomo
from server_app.engine.strategies.local_only import LocalOnly
from server_app.engine.strategy import Strategy
from server_app.policy import KoalaPolicy, PolicyError, check_fields_used

STRATEGIES: dict[str, type[Strategy]] = {
    "koala_homo": KoalaHomo,
    "koala_hetero": KoalaHetero,
    "fedavg_large": FedAvgLarge,
    "fedavg_small": FedAvgSmall,
    "local_only": LocalOnly,
}


def load_ref(ref: str, what: str) -> Any:
    """`module:attr` -> the object; PolicyError with the reason when it cannot be loaded."""
    try:
        return plugins.load_ref(ref, what)
    except plugins.PluginError as exc:
        raise PolicyError(str(exc)) from None


def strategy_class(policy: KoalaPolicy) -> type[Strategy]:
    if ":" in policy.strategy:
        cls = load_ref(policy.strategy, "strategy")
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise PolicyError(f"strategy {policy.strategy!r} is not a server_app.engine.strategy.Strategy subclass")
        return cls
    return STRATEGIES[policy.strategy]


def build_strategy(
    policy: KoalaPolicy,
    *,
    large: Any = None,
    proxy_x: np.ndarray | None = None,
    small_factory: Callable[[str], Any] | None = None,
    strict_fields: set[str] | None = None,
    proxy_labels: np.ndarray | None = None,
) -> Strategy:
    """The strategy a policy names, given the resources it may need.

    Explicitly set policy fields the strategy does not read raise PolicyError (`strict_fields`
    narrows the check to those fields: `koala sim` checks each method's own overrides, since its
    shared base policy also serves baselines). A plugin class receives the same keyword resources
    it declares in its constructor (large, proxy_x, small_factory, policy, proxy_labels: the labels
    of the proxy rows the server knows, -1 elsewhere; optional).
    """
    cls = strategy_class(policy)
    used = cls.policy_fields(policy)
    check_fields_used(policy, used, only=strict_fields)
    resources = {"large": large, "proxy_x": proxy_x, "small_factory": small_factory, "policy": policy,
                 "proxy_labels": proxy_labels}
    import inspect

    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in resources.items() if k in params}
    missing = [k for k in ("large", "proxy_x", "small_factory") if k in params and kwargs.get(k) is None
               and params[k].default is inspect.Parameter.empty]  # fmt: skip
    if missing:
        raise PolicyError(f"strategy {policy.strategy!r} needs {missing}")
    return cls(**kwargs)


__all__ = ["STRATEGIES", "FedAvgLarge", "FedAvgSmall", "KoalaHetero", "KoalaHomo", "KoalaStrategy", "LocalOnly",
           "build_strategy", "load_ref", "strategy_class"]  # fmt: skip
