"""`koala-device predict`: predictions of the device's served model for the inputs in a file."""

from __future__ import annotations

import argparse
import json

HELP = "predict classes for inputs in a .npy/.npz file, with the running agent's model (or a .tflite file)"
DESCRIPTION = """\
Predict classes for the inputs in INPUT (.npy: x; .npz: array x, and y when present: accuracy is
printed too). Asks the running agent (`koala-device run`) through its local endpoint -- found
from --config, or given with --socket / --url -- so the answer comes from the model the device
serves now (its int8 model after each round). With --model FILE.tflite, runs that model here,
without an agent. Prints one JSON object: classes, the model that answered, and accuracy if y is
known; --out FILE.npy saves the classes (or logits with --logits).

examples:
  koala-device predict --config device.json images.npy
  koala-device predict --socket /var/lib/koala/state/agent.sock test.npz --logits --out logits.npy
  koala-device predict --model state/model_int8.tflite test.npz
"""


def configure(p: argparse.ArgumentParser) -> None:
    from device_firmware_py.serving.endpoint import add_endpoint_args

    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("input", metavar="INPUT", help=".npy of inputs x [N,H,W,C] float32, or .npz with x (and y)")
    add_endpoint_args(p)
    p.add_argument("--model", help="run this .tflite model in this process instead of asking an agent")
    p.add_argument("--batch", type=int, default=256, help="rows per request to the agent (default 256)")
    p.add_argument("--logits", action="store_true", help="also return logits (JSON, or --out)")
    p.add_argument("--out", help="write the classes (or the logits with --logits) to this .npy")
    p.add_argument("--limit", type=int, default=20, help="classes printed in the JSON (default 20; all go to --out)")


def _read_input(path: str):  # -> (x, y | None)
    import numpy as np

    from device_firmware_py.cli import CommandError

    try:
        got = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None
    if isinstance(got, np.lib.npyio.NpzFile):
        with got:
            if "x" not in got.files:
                raise CommandError(f"{path} has no array x (has {got.files})")
            return np.asarray(got["x"]), (np.asarray(got["y"]) if "y" in got.files else None)
    return np.asarray(got), None


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from device_firmware_py.cli import CommandError

    x, y = _read_input(args.input)
    if x.dtype.kind != "f":
        raise CommandError(f"{args.input}: x has dtype {x.dtype}; the model takes float inputs scaled as in training")
    logits: np.ndarray | None  # None: the agent's API was not asked for logits
    if args.model:
        from device_firmware_py.serving.predictor import Predictor
        from device_firmware_py.serving.sample_store import SampleError

        pred = Predictor()
        try:
            with open(args.model, "rb") as f:
                pred.load(f.read(), kind="file")
            classes, logits, info = pred.predict(x)
        except (OSError, ValueError, RuntimeError, SampleError) as exc:
            raise CommandError(f"{args.model}: {exc}") from None
        model = {"file": args.model, "bytes": info.bytes, "sha256": info.sha256}
    else:
        from device_firmware_py.serving.client import DeviceClientError
        from device_firmware_py.serving.endpoint import client_from_args

        parts_c, parts_l, model = [], [], {}
        with client_from_args(args) as client:
            try:
                for i in range(0, max(len(x), 1), max(1, args.batch)):
                    out = client.predict_full(x[i : i + args.batch], logits=args.logits)
                    parts_c.append(np.asarray(out["classes"], np.int64))
                    if args.logits:
                        parts_l.append(np.asarray(out["logits"], np.float32))
                    model = out["model"]
            except DeviceClientError as exc:
                raise CommandError(str(exc)) from None
        classes = np.concatenate(parts_c) if parts_c else np.zeros(0, np.int64)
        logits = np.concatenate(parts_l) if parts_l else None
    report = {"n": int(len(classes)), "model": model, "classes": classes[: args.limit].tolist()}
    if y is not None and len(y) == len(classes):
        report["accuracy"] = round(float(np.mean(classes == np.asarray(y).reshape(-1))), 4)
    if args.out:
        np.save(args.out, logits if args.logits and logits is not None else classes)
        report["out"] = args.out
    print(json.dumps(report))
    return 0
