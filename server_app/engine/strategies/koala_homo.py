"""KOALA homogeneous mode: one small architecture on every device.

Default teacher (policy `teacher` unset) = the paper's path: FedAvg of the small weights
(sample-weighted); the averaged model's proxy logits distil into the large model.
`teacher = "device_logits"`: devices upload proxy logits instead and the server fuses them
(ensemble distillation, policy `fusion`)."""

from __future__ import annotations

from server_app.engine.strategies.koala import KoalaStrategy


class KoalaHomo(KoalaStrategy):
    name = "koala_homo"
    mode = "homo"
