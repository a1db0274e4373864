"""POST /api/v1/predict: the server's current large model for authenticated clients (the logic is in
server_app/models/predictor.py; devices reach the same model over MQTT with the cascade).

Always needs the bearer token (also from localhost: inputs are data, and a forward pass costs the
server CPU). Body: JSON — a list of inputs, or {"x": [...]} — or {"npy_b64": "<base64 of a .npy>"},
or a raw .npy (Content-Type application/x-npy). Inputs are NHWC float32 scaled as the model card's
input.normalisation says; at most 256 rows and 4 MiB per request.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request

from server_app.api import problems
from server_app.api.auth import require_token
from server_app.api.deps import get_registry
from server_app.models.predictor import (
    LargePredictor,
    NoLargeModel,
    PredictInputError,
    latest_export_in_registry,
)

router = APIRouter(tags=["models"])
MAX_BODY_BYTES = 4 << 20


def predictor_of(request: Request) -> LargePredictor:
    """The services' predictor (one model in memory per process), else one on the app's registry."""
    svc = getattr(request.app.state, "services", None)
    p = getattr(svc, "predictor", None)
    if isinstance(p, LargePredictor):
        return p
    p = getattr(request.app.state, "large_predictor", None)
    if p is None:
        p = request.app.state.large_predictor = LargePredictor(latest_export_in_registry(get_registry(request)))
    return p


async def _read_inputs(request: Request) -> np.ndarray:
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > MAX_BODY_BYTES:
        raise HTTPException(413, detail=f"body of {n} bytes is over {MAX_BODY_BYTES}: send fewer inputs per request")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, detail=f"body is over {MAX_BODY_BYTES} bytes: send fewer inputs per request")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("application/x-npy", "application/octet-stream"):
        return _npy(bytes(body))
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise HTTPException(400, detail=f"body is not JSON ({exc}); send a list of inputs, {{\"x\": [...]}}, "
                                        "{\"npy_b64\": \"...\"} or a .npy as application/x-npy") from None  # fmt: skip
    if isinstance(obj, dict) and "npy_b64" in obj:
        try:
            return _npy(base64.b64decode(str(obj["npy_b64"]), validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, detail="npy_b64 is not base64") from None
    x = obj.get("x") if isinstance(obj, dict) else obj
    if x is None:
        raise HTTPException(400, detail="JSON body needs the inputs: a list, or an object with key x (or npy_b64)")
    try:
        return np.asarray(x, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise HTTPException(400, detail=f"x is not a numeric (rectangular) array: {exc}") from None


def _npy(data: bytes) -> np.ndarray:
    try:
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))
    except (ValueError, OSError, EOFError) as exc:
        raise HTTPException(400, detail=f"body is not a .npy array ({exc})") from None


@router.post(
    "/predict",
    summary="Predict with the large model",
    description="The server's current large model (the newest published version's portable export) on the "
    "inputs in the body: a JSON list of inputs, `{\"x\": [...]}`, `{\"npy_b64\": \"...\"}` or a `.npy` "
    "(`application/x-npy`); NHWC float32 scaled as the model card says (Fashion-MNIST: pixel / 255), at most "
    "256 inputs. Answers `classes`, `class_names`, `probabilities` and the `model_version` that answered. "
    "Needs the bearer token, also from localhost.",
    dependencies=[Depends(require_token)],
    responses={**problems.WRITE_ERRORS, 400: problems._doc(400, "inputs of shape [2, 28, 28] do not fit the model"),
               413: problems._doc(413, "body is over 4194304 bytes"),
               503: problems._doc(503, "no large model yet")},  # fmt: skip
)
async def predict(request: Request) -> dict[str, Any]:
    x = await _read_inputs(request)
    predictor = predictor_of(request)
    try:
        # a forward pass is CPU work: off the event loop
        from starlette.concurrency import run_in_threadpool

        p = await run_in_threadpool(predictor.predict, x)
    except PredictInputError as exc:
        raise HTTPException(400, detail=str(exc)) from None
    except NoLargeModel as exc:
        raise HTTPException(503, detail=str(exc)) from None
    return {"classes": p.classes.tolist(), "class_names": [p.class_names[i] for i in p.classes],
            "probabilities": np.round(p.probabilities, 6).tolist(), "model_version": p.version, "round": p.round_id}  # fmt: skip
