"""KOALA heterogeneous mode: several small architectures in one fleet (assigned round-robin).

Default teacher (policy `teacher` unset) = "device_logits": every device uploads proxy logits;
the server fuses them into consensus soft labels with the policy's `fusion` rule (default
class_aware: measured best at full scale and under attack, README / docs/security.md) and
distils the large model. `teacher = "avg_model"` +
`rkd = "per_group"`: the related code's path — FedAvg per architecture, each architecture's
averaged model distils into its own copy of the large model, then the copies are averaged."""

from __future__ import annotations

from server_app.engine.strategies.koala import KoalaStrategy


class KoalaHetero(KoalaStrategy):
    name = "koala_hetero"
    mode = "hetero"
