"""An attacker device for bench/attacks_deployed.py: the real device agent, with its result forged.

    python -m bench.attack_agent ATTACK run --config devices/dev000/config.json

It is `koala-device run` (device_firmware_py's agent, unchanged: its MQTT client, credentials,
status/LWT, proxy digest, state files), except that `execute_assignment`, as the agent module
imported it, is wrapped: the device trains honestly, then the result it publishes is replaced by a
malicious one of the same format, so it passes the frame checks and reaches the server's accept
decision and aggregation exactly as an honest result would. Attacks (as bench/attacks.py forges
them in simulation):

  sign_flip       weights negated (and proxy logits, where asked for)
  onehot_logits   proxy logits: "every proxy image is a 3", confidently (50 on class 3, 0 elsewhere)

Nothing here is product code: the product agent is not changed, the wrapper lives in bench/.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

ATTACKS = ("sign_flip", "onehot_logits")
ONEHOT_CLASS = 3
ONEHOT_LOGIT = 50.0


def forge(result: Any, attack: str) -> Any:
    """The malicious version of an honest contract Result (a new, validated Result)."""
    from device_firmware_py.contract.messages import Result

    w, z = result.weights, result.proxy_logits
    if attack == "sign_flip":
        w = [-np.asarray(x) for x in w] if w is not None else None
        z = -np.asarray(z) if z is not None else None
    elif attack == "onehot_logits":
        if z is not None:
            z = np.zeros_like(np.asarray(z, np.float32))
            z[:, ONEHOT_CLASS] = ONEHOT_LOGIT
    else:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    return Result(round_id=result.round_id, device_id=result.device_id, arch=result.arch,
                  num_samples=result.num_samples, model_version=result.model_version,
                  label_histogram=result.label_histogram, metrics=dict(result.metrics),
                  proxy_digest=result.proxy_digest, proxy_logits=z, weights=w)  # fmt: skip


def install(attack: str) -> None:
    """Wrap the agent's execute_assignment so every result it publishes is forged."""
    import device_firmware_py.agent.agent as agent_module

    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    honest = agent_module.execute_assignment

    def malicious(*args: Any, **kw: Any) -> Any:
        return forge(honest(*args, **kw), attack)

    agent_module.execute_assignment = malicious


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(
            f"usage: python -m bench.attack_agent {{{','.join(ATTACKS)}}} run --config FILE", file=sys.stderr
        )
        return 2
    install(argv[0])
    from device_firmware_py.cli import main as device_main

    return device_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
