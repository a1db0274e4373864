"""`koala-device feed`: hand labeled samples from a file to the running agent's sample store."""

from __future__ import annotations

import argparse
import json

HELP = "send labeled samples (.npz with x and y) to the running agent's on-device sample store"
DESCRIPTION = """\
Send the labeled samples in INPUT (.npz with x [N,H,W,C] float32 and y [N] int) to the running
agent, which keeps them in its bounded on-device store (newest store_max_samples, at most
store_max_per_class per label) and trains on them in its next rounds. The agent must run with
data_source = store. A bad batch (shape, dtype, label) is refused whole, with the reason; samples
never leave the device (only counts and the label histogram are reported to the server).
Prints the store's counts after the last batch.

examples:
  koala-device feed --config device.json labeled.npz
  koala-device feed --socket /var/lib/koala/state/agent.sock labeled.npz --batch 64
"""


def configure(p: argparse.ArgumentParser) -> None:
    from device_firmware_py.serving.endpoint import add_endpoint_args

    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("input", metavar="INPUT", help=".npz with arrays x (float32 inputs) and y (int labels)")
    add_endpoint_args(p)
    p.add_argument("--batch", type=int, default=256, help="samples per request (default 256)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from device_firmware_py.cli import CommandError
    from device_firmware_py.serving.client import DeviceClientError
    from device_firmware_py.serving.endpoint import client_from_args

    try:
        with np.load(args.input, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise CommandError(f"{args.input} lacks {missing} (has {z.files}): feed needs inputs x and labels y")
            x, y = np.asarray(z["x"]), np.asarray(z["y"])
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {args.input} as .npz: {exc}") from None
    if len(x) != len(y):
        raise CommandError(f"{args.input}: {len(x)} inputs but {len(y)} labels")
    sent, res = 0, {}
    with client_from_args(args) as client:
        try:
            for i in range(0, len(x), max(1, args.batch)):
                res = client.add_samples(x[i : i + args.batch], y[i : i + args.batch])
                sent += int(res["accepted"])
        except DeviceClientError as exc:
            raise CommandError(f"{exc}\n  ({sent} samples were stored before this batch)") from None
    print(json.dumps({"sent": sent, "num_samples": res.get("num_samples"), "evicted": res.get("evicted"),
                      "label_histogram": res.get("label_histogram")}))  # fmt: skip
    return 0
