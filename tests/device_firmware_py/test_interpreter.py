"""make_interpreter's signature runners: no resize of 0-d inputs (the aarch64 ai-edge-litert wheels
segfault on it, docs/arm64.md), otherwise the same numbers as the library's own runner."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from device_firmware_py.runtime.interpreter import OpResolverType, _Interpreter, make_interpreter
from device_firmware_py.runtime.manifest import artifact_path


class _RecordingWrapper:
    """Delegates to the pybind wrapper, recording the shapes passed to ResizeInputTensor."""

    def __init__(self, inner: Any):
        self._inner, self.resized = inner, []

    def ResizeInputTensor(self, index: int, shape: np.ndarray, strict: bool, subgraph: int) -> Any:  # noqa: N802
        self.resized.append(tuple(int(d) for d in shape))
        return self._inner.ResizeInputTensor(index, shape, strict, subgraph)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _feeds(rng: np.random.Generator, b: int = 32) -> dict[str, dict[str, np.ndarray]]:
    x = rng.standard_normal((b, 8, 8, 1)).astype(np.float32)
    return {
        "train": {"x": x, "y": rng.integers(0, 10, b).astype(np.int32), "lr": np.array(1e-3, np.float32)},
        "distill": {"x": x, "teacher": rng.standard_normal((b, 10)).astype(np.float32),
                    "temperature": np.array(2.0, np.float32), "lr": np.array(1e-3, np.float32)},  # fmt: skip
    }


def test_runner_never_resizes_to_an_empty_shape():
    interp = make_interpreter(model_path=str(artifact_path("cnn_small", (8, 8, 1))), num_threads=1)
    feeds = _feeds(np.random.default_rng(0))
    for sig in ("train", "distill"):
        runner = interp.get_signature_runner(sig)
        runner._interpreter_wrapper = rec = _RecordingWrapper(runner._interpreter_wrapper)
        runner(**feeds[sig])
        assert rec.resized and () not in rec.resized, rec.resized
    logits = interp.get_signature_runner("logits")
    assert logits(x=feeds["train"]["x"][:5])["logits"].shape == (5, 10)  # non-scalar inputs still resize


@pytest.mark.parametrize("delegates", [True, False])
def test_same_numbers_as_the_library_runner(delegates):
    path = str(artifact_path("cnn_small", (8, 8, 1)))
    ours = make_interpreter(model_path=path, num_threads=1, delegates=delegates)
    kw = {} if delegates else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    theirs = _Interpreter(model_path=path, num_threads=1, **kw)
    rng = np.random.default_rng(1)
    for _ in range(3):
        feeds = _feeds(rng)
        for sig in ("train", "distill"):
            a = ours.get_signature_runner(sig)(**feeds[sig])["loss"]
            b = theirs.get_signature_runner(sig)(**feeds[sig])["loss"]
            assert np.array_equal(a, b), (sig, a, b)
    x = feeds["train"]["x"]
    np.testing.assert_array_equal(ours.get_signature_runner("logits")(x=x)["logits"],
                                  theirs.get_signature_runner("logits")(x=x)["logits"])  # fmt: skip
