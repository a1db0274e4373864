"""The one place that picks the LiteRT interpreter: ai-edge-litert, else the old tflite-runtime."""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter as _Interpreter
    from ai_edge_litert.interpreter import OpResolverType, SignatureRunner

    RUNTIME = "ai-edge-litert"
except ImportError:  # pragma: no cover - fallback for devices with the legacy wheel
    from tflite_runtime.interpreter import Interpreter as _Interpreter
    from tflite_runtime.interpreter import OpResolverType, SignatureRunner

    RUNTIME = "tflite-runtime"


class _ScalarSafeRunner(SignatureRunner):  # type: ignore[misc]  # LiteRT ships no type information
    """SignatureRunner.__call__ without resizing 0-d inputs (`lr`, `temperature`).

    The upstream runner resizes every input to `value.shape` before each invoke. The aarch64
    ai-edge-litert wheels (1.2.0 to 2.3.0 at least) crash on an empty shape: their
    InterpreterWrapper::ResizeInputTensor is compiled as `dims[0] = 0; memset(dims + 1, 0, 4 * n - 4)`,
    i.e. a memset of 2**64 - 4 bytes when n == 0 (x86-64 wheels: `memset(dims, 0, 4 * n)`). That is why
    every `train`/`distill` call segfaulted on arm64 while `logits` ran (docs/arm64.md). A 0-d tensor
    cannot change shape, so skipping its resize changes nothing else; the rest is the upstream call."""

    def __call__(self, **kwargs: Any) -> dict[str, np.ndarray]:
        if len(kwargs) != len(self._inputs):
            raise ValueError(f"expected {len(self._inputs)} inputs for this signature, got {len(kwargs)}")
        wrapper, subgraph = self._interpreter_wrapper, self._subgraph_index
        for name, value in kwargs.items():
            if name not in self._inputs:
                raise ValueError(f"invalid input name {name!r} for this signature")
            if np.ndim(value):
                wrapper.ResizeInputTensor(self._inputs[name], np.array(np.shape(value), np.int32), False, subgraph)
        wrapper.AllocateTensors(subgraph)
        for name, value in kwargs.items():
            wrapper.SetTensor(self._inputs[name], value, subgraph)
        wrapper.Invoke(subgraph)
        return {name: wrapper.GetTensor(index, subgraph) for name, index in self._outputs}


class _KoalaInterpreter(_Interpreter):  # type: ignore[misc]  # LiteRT ships no type information
    """The runtime's Interpreter with signature runners that work on aarch64 (see _ScalarSafeRunner)."""

    def get_signature_runner(self, signature_key: str | None = None) -> SignatureRunner:
        runner = super().get_signature_runner(signature_key)  # resolves the default key, validates it
        return _ScalarSafeRunner(interpreter=self, signature_key=runner._signature_key)


def make_interpreter(
    *, model_path: str | None = None, model_content: bytes | None = None, num_threads: int = 2, delegates: bool = True
) -> Any:
    """An Interpreter with the default delegates (XNNPACK: ~2x faster training steps on x86), or
    the builtin kernels only (`delegates=False`)."""
    if delegates:
        return _KoalaInterpreter(model_path=model_path, model_content=model_content, num_threads=num_threads)
    return _KoalaInterpreter(model_path=model_path, model_content=model_content, num_threads=num_threads,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)  # fmt: skip
