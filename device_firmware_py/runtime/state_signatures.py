"""Add `get_state` / `set_state` signatures to a training artifact, in memory (no TensorFlow).

A training artifact keeps its weights AND its optimizer state (Adam moments `m_*`, `v_*`, the
bias-correction powers `adam_b1t`, `adam_b2t`) in resource variables that live as long as the
Interpreter. Its own signatures read the weights (`get_weights`) but never the optimizer state, so
closing the interpreter used to lose it. Each LiteRT signature also keeps its own activation arena
for the interpreter's life (mobilenet_tiny 28x28x1 at batch 32: distill ~48 MiB, train ~41 MiB), so
a device that runs forward KD and then local training holds both arenas at once.

`with_state_signatures(buf)` returns the same model with two more subgraphs built from the
model's own VAR_HANDLE / READ_VARIABLE / ASSIGN_VARIABLE / CALL_ONCE operators:

  get_state() -> {variable name: value}   every resource variable, by its shared name
  set_state(**{variable name: value})     assign them all (after the variable initializer ran)

so `SmallModel(low_memory=True)` can close the interpreter after each phase (freeing its arena and
XNNPACK workspace) and open a fresh one for the next with the whole state carried in numpy: the
weights after a round are bit-identical to one long-lived interpreter (tests/device_firmware_py/
test_low_memory.py). The artifact on disk and its sha256 are unchanged.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

GET_STATE, SET_STATE = "get_state", "set_state"
VERSION = 1  # of what this module adds; part of the cache file name


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def with_state_signatures(buf: bytes) -> tuple[bytes, dict[str, tuple[int, ...]]]:
    """(model bytes with get_state/set_state added, {variable shared name: shape}).

    Raises ValueError when the model has no resource variables or a variable's shape cannot be
    read from a READ_VARIABLE of it (the caller then keeps one interpreter for the model's life)."""
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(buf, 0)
    names: dict[int, str] = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    keys = {sd.signatureKey.decode() for sd in model.signatureDefs or []}
    if GET_STATE in keys or SET_STATE in keys:
        raise ValueError("model already has get_state/set_state signatures")

    def opname(op: Any) -> str:
        oc = model.operatorCodes[op.opcodeIndex]
        return names.get(max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)), "?")

    proto: dict[str, Any] = {}  # one operator of each kind we need, with its options and opcode index
    shapes: dict[str, tuple[int, ...]] = {}
    handles: set[str] = set()
    for g in model.subgraphs:
        handle: dict[int, str] = {}  # resource tensor -> variable shared name, in this subgraph
        for op in g.operators or []:
            kind = opname(op)
            if kind in ("CALL_ONCE", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"):
                proto.setdefault(kind, op)
            if kind == "VAR_HANDLE":
                handle[int(op.outputs[0])] = op.builtinOptions.sharedName.decode()
                handles.add(handle[int(op.outputs[0])])
            elif kind == "READ_VARIABLE" and int(op.inputs[0]) in handle:
                t = g.tensors[int(op.outputs[0])]
                if t.type != schema.TensorType.FLOAT32:
                    raise ValueError(f"variable {handle[int(op.inputs[0])]} is not float32")
                shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
                shapes.setdefault(handle[int(op.inputs[0])], shape)
    if not handles:
        raise ValueError("model has no resource variables")
    missing = sorted(handles - set(shapes))
    if missing:
        raise ValueError(f"no READ_VARIABLE gives the shape of {missing}")
    for kind in ("VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"):
        if kind not in proto:
            raise ValueError(f"model has no {kind} operator to copy")
    order = sorted(shapes)

    def subgraph(name: str, getter: bool) -> None:
        g = schema.SubGraphT()
        g.name, g.tensors, g.operators = name.encode(), [], []
        ins: list[int] = []
        outs: list[int] = []
        if "CALL_ONCE" in proto:  # run the variable initializer first, as every other signature does
            g.operators.append(copy.deepcopy(proto["CALL_ONCE"]))
        tmaps = []
        for n in order:
            res, val = schema.TensorT(), schema.TensorT()
            res.shape, res.type, res.buffer, res.name = np.array([], np.int32), schema.TensorType.RESOURCE, 0, f"{name}/{n}/handle".encode()
            val.shape, val.type, val.buffer, val.name = np.array(shapes[n], np.int32), schema.TensorType.FLOAT32, 0, f"{name}/{n}".encode()
            ri, vi = len(g.tensors), len(g.tensors) + 1
            g.tensors += [res, val]
            vh = copy.deepcopy(proto["VAR_HANDLE"])
            vh.inputs, vh.outputs = np.array([], np.int32), np.array([ri], np.int32)
            vh.builtinOptions.sharedName = n.encode()
            if getter:
                op = copy.deepcopy(proto["READ_VARIABLE"])
                op.inputs, op.outputs = np.array([ri], np.int32), np.array([vi], np.int32)
                outs.append(vi)
            else:
                op = copy.deepcopy(proto["ASSIGN_VARIABLE"])
                op.inputs, op.outputs = np.array([ri, vi], np.int32), np.array([], np.int32)
                ins.append(vi)
            g.operators += [vh, op]
            tm = schema.TensorMapT()
            tm.name, tm.tensorIndex = n.encode(), vi
            tmaps.append(tm)
        g.inputs, g.outputs = np.array(ins, np.int32), np.array(outs, np.int32)
        sd = schema.SignatureDefT()
        sd.signatureKey, sd.subgraphIndex = name.encode(), len(model.subgraphs)
        sd.inputs, sd.outputs = ([], tmaps) if getter else (tmaps, [])
        model.subgraphs.append(g)
        model.signatureDefs.append(sd)

    subgraph(GET_STATE, getter=True)
    subgraph(SET_STATE, getter=False)
    b = flatbuffers.Builder(len(buf) + 65536)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output()), {n: shapes[n] for n in order}


def cached_state_model(src: Path | str, cache_dir: Path | str, sha256: str) -> Path:
    """The model of `src` with get_state/set_state, as a file in `cache_dir` (made once, keyed by the
    artifact's sha256). It is made in a short-lived child process: unpacking the flatbuffer into
    Python objects leaves ~3-4 MiB behind in the process that does it (measured on mobilenet_tiny);
    the interpreter then memory-maps the cached file instead of holding a copy of its bytes."""
    import subprocess
    import sys

    src = Path(src)
    out = Path(cache_dir) / f"{src.stem}-{sha256[:16]}.state{VERSION}.tflite"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", __name__, str(src), str(out)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.is_file():
        raise ValueError(f"state signatures for {src.name}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return out


def _main(argv: list[str]) -> int:
    from device_firmware_py.fileio import atomic_write

    src, dst = Path(argv[0]), Path(argv[1])
    blob, _ = with_state_signatures(src.read_bytes())
    atomic_write(dst, blob)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
