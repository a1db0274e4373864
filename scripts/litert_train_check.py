#!/usr/bin/env python3
"""Does LiteRT on-device training run on this machine? Stand-alone: numpy + ai-edge-litert (or tflite-runtime).

    python3 scripts/litert_train_check.py device_firmware_py/artifacts/mlp_tiny_8x8x1.tflite [default|builtin|ref] [threads] [sigs] [upstream|skip-scalar-resize]

Runs each signature (default `logits,train,distill`) twice on random inputs and prints the outputs.
`upstream` calls the library's SignatureRunner as is; `skip-scalar-resize` does the same call without
resizing 0-d inputs (what device_firmware_py/runtime/interpreter.py does). On aarch64 the upstream path
segfaults in the first `train` call with every ai-edge-litert wheel tried (docs/arm64.md)."""
import faulthandler
import platform
import sys

import numpy as np

faulthandler.enable()
model = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "default"
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
sigs = (sys.argv[4] if len(sys.argv) > 4 else "logits,train,distill").split(",")
skip_scalar = len(sys.argv) > 5 and sys.argv[5] == "skip-scalar-resize"
try:
    import ai_edge_litert
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    runtime = "ai-edge-litert " + getattr(ai_edge_litert, "__version__", "?")
except ImportError:
    import tflite_runtime
    from tflite_runtime.interpreter import Interpreter, OpResolverType

    runtime = "tflite-runtime " + tflite_runtime.__version__
kw = {}
if mode == "builtin":
    kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
elif mode == "ref":
    kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_REF
print(runtime, platform.machine(), "numpy", np.__version__, "mode", mode, "threads", threads,
      "skip-scalar-resize" if skip_scalar else "upstream", flush=True)
interp = Interpreter(model_path=model, num_threads=threads, **kw)
print("interpreter ok; signatures", sorted(interp.get_signature_list()), flush=True)
rng = np.random.default_rng(0)
for sig in sigs:
    runner = interp.get_signature_runner(sig)
    feeds = {}
    for name, d in runner.get_input_details().items():
        if name == "y":
            feeds[name] = rng.integers(0, 10, d["shape"]).astype(d["dtype"])
        elif name in ("lr", "temperature"):
            feeds[name] = np.array(1e-3 if name == "lr" else 1.0, d["dtype"])
        else:
            feeds[name] = rng.standard_normal(d["shape"]).astype(d["dtype"])
    print(sig, "inputs", {k: (tuple(v.shape), str(v.dtype)) for k, v in feeds.items()}, flush=True)
    for i in range(2):
        if skip_scalar:  # SignatureRunner.__call__ minus the ResizeInputTensor of 0-d inputs
            w, sg = runner._interpreter_wrapper, runner._subgraph_index
            for k, v in feeds.items():
                if np.ndim(v):
                    w.ResizeInputTensor(runner._inputs[k], np.array(np.shape(v), np.int32), False, sg)
            w.AllocateTensors(sg)
            for k, v in feeds.items():
                w.SetTensor(runner._inputs[k], v, sg)
            w.Invoke(sg)
            out = {k: w.GetTensor(idx, sg) for k, idx in runner._outputs}
        else:
            out = runner(**feeds)
        print(sig, "call", i, {k: np.asarray(v).ravel()[:3].tolist() for k, v in out.items()}, flush=True)
print("OK", flush=True)
