"""KOALA Edge server: SQL registry, round orchestrator, large model and bidirectional distillation.

Kept import-light on purpose: `koala --help` and `koala device ...` must work without torch.
"""

__version__ = "0.1.0"
