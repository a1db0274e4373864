"""Do the exported models compute what the trained ones do? (issue 30, `export` of models_at_work.json)

Trains the server's large model briefly (LargeCNN width 16, the policy default) and a cnn_small
(LiteRT, one epoch), exports them as the server does after a round (server_app/models/export.py),
and compares every format against the module it came from on the whole test set: Fashion-MNIST's
10,000 test images when /usr/share/datasets/fashion-mnist exists, else digits' 449.

Per format: `max_abs_diff` (largest |logit difference| over all images and classes) and
`argmax_agreement` (share of images with the same predicted class), plus each one's accuracy.

    .venv/bin/python -m bench.models_export            # writes bench/results/models_at_work.json["export"]
    .venv/bin/python -m bench.models_export --quick    # 1,000 images, smaller training (a smoke run)

Only the `export` key of the results file is rewritten (read-modify-write): other benchmarks keep
their sections (device_predict, swap_failures, cascade) in the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "models_at_work.json"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _compare(ref: np.ndarray, got: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    return {"max_abs_diff": float(np.max(np.abs(ref - got))), "argmax_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
            "accuracy": float(np.mean(got.argmax(1) == y))}  # fmt: skip


def measure(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from device_firmware_py.runtime.manifest import format_input
    from device_firmware_py.runtime.quantize import TFLiteLogits
    from device_firmware_py.runtime.small_model import SmallModel
    from server_app.data.datasets import load_dataset
    from server_app.models import export as mx
    from server_app.models.card import ExportContext
    from server_app.models.large import build_large_model, predict_logits
    from server_app.policy import KoalaPolicy

    torch.manual_seed(seed)
    name = "fashion-mnist" if FMNIST.is_dir() else "digits"
    ds = load_dataset(name, seed=seed)
    n_test = 1000 if quick else len(ds.y_test)
    n_train = 2000 if quick else min(12000, len(ds.y_train))
    x, y = ds.x_test[:n_test], ds.y_test[:n_test]
    pol = KoalaPolicy()
    shape = ds.input_shape

    t0 = time.perf_counter()
    model = build_large_model(pol.large, shape, 10, pol.seed)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xt, yt = torch.from_numpy(ds.x_train[:n_train]), torch.from_numpy(ds.y_train[:n_train])
    model.train()
    for i in range(0, n_train, 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[i : i + 64]), yt[i : i + 64]).backward()
        opt.step()
    model.eval()
    arch = pol.archs[0]
    small = SmallModel(f"{arch}_{format_input(shape)}", num_threads=1)
    small.train(ds.x_train[:n_train], ds.y_train[:n_train], epochs=1, seed=seed)
    t_train = time.perf_counter() - t0

    ctx = ExportContext.from_policy(pol, shape, 10, dataset=name, calibration_x=ds.x_train[-256:])
    state = {"large": model.state_dict(), "small": {arch: small.get_weights()}}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        edir = mx.write_export(d, 1, state, ctx, round_id=0)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        mx.prebuild(edir)
        t_derive = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size for p in sorted(Path(edir).rglob("*")) if p.is_file()}

        ref = predict_logits(model, x)
        formats: dict[str, Any] = {}
        formats["safetensors"] = _compare(ref, predict_logits(mx.load_large(edir), x), y)
        sd = torch.load(Path(edir) / "model.pt", weights_only=True)
        m_pt = mx.build_model(ctx.factory, ctx.options, shape, 10)
        m_pt.load_state_dict(sd)
        formats["pt"] = _compare(ref, predict_logits(m_pt, x), y)
        ts = torch.jit.load(str(Path(edir) / "model.torchscript.pt"))
        with torch.no_grad():
            formats["torchscript"] = _compare(ref, ts(torch.from_numpy(x)).numpy(), y)
        sess = ort.InferenceSession(str(Path(edir) / "model.onnx"), providers=["CPUExecutionProvider"])
        formats["onnx"] = _compare(ref, np.concatenate([sess.run(None, {"x": x[i : i + 1000]})[0]
                                                        for i in range(0, len(x), 1000)]), y)  # fmt: skip
        small_ref = small.logits(x)
        small_out = {"reference_accuracy": float(np.mean(small_ref.argmax(1) == y))}
        for fmt in mx.SMALL_FORMATS:
            got = TFLiteLogits(mx.ensure_small(edir, arch, fmt), num_threads=1)(x)
            small_out[f"tflite_{fmt}"] = _compare(small_ref, got, y)

    return {
        "what": "every exported format vs the PyTorch module (large) / the LiteRT training model (small) it came from",
        "dataset": name, "test_images": int(n_test), "quick": quick,
        "large": {"factory": ctx.factory, "options": ctx.options, "train_images": n_train, "epochs": 1,
                  "reference_accuracy": float(np.mean(ref.argmax(1) == y))},
        "formats": formats,
        "small": {"arch": arch, **small_out},
        "seconds": {"train": round(t_train, 2), "write_export": round(t_write, 3), "derive_formats": round(t_derive, 2)},
        "bytes": sizes,
        "torch_threads": torch.get_num_threads(),
        "reproduce": ".venv/bin/python -m bench.models_export" + (" --quick" if quick else ""),
    }  # fmt: skip


def write_section(result: dict[str, Any], path: Path = RESULTS, key: str = "export") -> None:
    """Replace only `key` of the JSON file (other benchmarks' sections are kept), atomically."""
    from device_firmware_py.fileio import atomic_write

    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        doc = {}
    doc[key] = result
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 test images, 2,000 training images")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    res = measure(quick=args.quick)
    write_section(res, args.out)
    for fmt, c in {**res["formats"], **{k: v for k, v in res["small"].items() if isinstance(v, dict)}}.items():
        print(f"{fmt:12s} max_abs_diff={c['max_abs_diff']:.3g} argmax_agreement={c['argmax_agreement']:.4f} "
              f"accuracy={c['accuracy']:.4f}")  # fmt: skip
    print(f"{res['dataset']} {res['test_images']} test images -> {args.out} [export]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
