"""The server's large model (PyTorch) and its FLOP/parameter accounting."""

from server_app.models.large import LargeCNN, build_large

__all__ = ["LargeCNN", "build_large"]
