"""Read-only views of a .tflite flatbuffer: the ops of EVERY subgraph and the signature list.

`Interpreter._get_ops_details()` only lists subgraph 0, but a multi-signature training model has
one subgraph per signature (+ the variable initializer); proving "builtin ops only" needs all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

try:
    from ai_edge_litert import schema_py_generated as schema
except ImportError:  # pragma: no cover - old tflite-runtime installs ship no schema module
    schema = None


@dataclass(frozen=True)
class OpUse:
    subgraph: int
    op: str  # builtin name (e.g. CONV_2D) or "CUSTOM:<custom_code>"


def _builtin_names() -> dict[int, str]:
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _model(buf: bytes) -> Any:  # schema.Model: LiteRT ships no type information
    if schema is None:
        raise RuntimeError("ai_edge_litert.schema_py_generated is needed to inspect .tflite files")
    return schema.Model.GetRootAs(buf, 0)


def list_ops(buf: bytes) -> list[OpUse]:
    """Every operator of every subgraph, in order."""
    model = _model(buf)
    names = _builtin_names()
    codes: list[str] = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = names.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM":
            custom = oc.CustomCode()
            name = "CUSTOM:" + (custom.decode() if custom else "?")
        codes.append(name)
    out: list[OpUse] = []
    for s in range(model.SubgraphsLength()):
        sg = model.Subgraphs(s)
        for j in range(sg.OperatorsLength()):
            out.append(OpUse(s, codes[sg.Operators(j).OpcodeIndex()]))
    return out


def non_builtin_ops(buf: bytes) -> list[OpUse]:
    """Flex (TF kernels) and custom ops: anything a plain LiteRT runtime may be unable to run."""
    return [u for u in list_ops(buf) if u.op.startswith("CUSTOM") or "FLEX" in u.op.upper()]


def signature_keys(buf: bytes) -> list[str]:
    model = _model(buf)
    return [model.SignatureDefs(i).SignatureKey().decode() for i in range(model.SignatureDefsLength())]
