"""The one place that picks the LiteRT interpreter: ai-edge-litert, else the old tflite-runtime."""

from __future__ import annotations

from typing import Any

try:
    from ai_edge_litert.interpreter import Interpreter as _Interpreter

    RUNTIME = "ai-edge-litert"
except ImportError:  # pragma: no cover - fallback for devices with the legacy wheel
    from tflite_runtime.interpreter import Interpreter as _Interpreter  # type: ignore[no-redef]

    RUNTIME = "tflite-runtime"


def make_interpreter(
    *, model_path: str | None = None, model_content: bytes | None = None, num_threads: int = 2, delegates: bool = True
) -> Any:
    """An Interpreter with the default delegates (XNNPACK: ~2x faster training steps on x86), or
    the builtin kernels only (`delegates=False`)."""
    if delegates:
        return _Interpreter(model_path=model_path, model_content=model_content, num_threads=num_threads)
    from ai_edge_litert.interpreter import OpResolverType

    return _Interpreter(model_path=model_path, model_content=model_content, num_threads=num_threads,
                        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)  # fmt: skip
