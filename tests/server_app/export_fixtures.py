"""Shared helpers of the model-export tests (test_model_export.py, test_models_cli.py) and the
export benchmark (bench/models_export.py): real data, a briefly trained large model and small model,
and a server-like models directory (checkpoint + export + registry row).

Not a conftest (tests/conftest.py already shadows that name for other folders); imported explicitly.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class EvalData:
    name: str  # fashion-mnist | digits
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        h, w, c = self.x_test.shape[1:]
        return int(h), int(w), int(c)


def eval_data() -> EvalData:
    """Fashion-MNIST (10,000 test images) where the Debian package is installed, else digits."""
    from server_app.data.datasets import load_dataset

    name = "fashion-mnist" if FMNIST.is_dir() else "digits"
    ds = load_dataset(name)
    return EvalData(name, ds.x_train, ds.y_train, ds.x_test, ds.y_test)


def trained_state(data: EvalData, archs: tuple[str, ...] = ("cnn_small",), n_train: int = 1920, seed: int = 0) -> dict[str, Any]:
    """A strategy-like state: a large model after a few Adam steps (so its logits are not the near
    ties of an untrained net) and the small models of `archs` after one LiteRT epoch."""
    import torch

    from device_firmware_py.runtime.manifest import format_input
    from device_firmware_py.runtime.small_model import SmallModel
    from server_app.models.large import build_large

    model = build_large(data.shape, 10, seed=seed, width=16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.from_numpy(data.x_train[:n_train]), torch.from_numpy(data.y_train[:n_train])
    model.train()
    for i in range(0, len(x), 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
        opt.step()
    model.eval()
    small = {}
    for arch in archs:
        sm = SmallModel(f"{arch}_{format_input(data.shape)}", num_threads=1)
        sm.train(data.x_train[:n_train], data.y_train[:n_train], epochs=1, seed=seed)
        small[arch] = sm.get_weights()
    return {"version": 1, "picked": {}, "large": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "small": small, "_model": model}  # fmt: skip


def context(data: EvalData, archs: tuple[str, ...] = ("cnn_small",)) -> Any:
    from server_app.models.card import ExportContext
    from server_app.policy import KoalaPolicy

    pol = KoalaPolicy(strategy="koala_hetero" if len(archs) > 1 else "koala_homo", archs=list(archs))
    data_info = {"proxy_sha256": "0" * 64, "proxy_size": 256, "test_sha256": "1" * 64, "test_size": len(data.y_test)}
    return ExportContext.from_policy(pol, data.shape, 10, dataset=data.name, data=data_info,
                                     calibration_x=data.x_train[-256:])  # fmt: skip


def server_models_dir(root: Path, state: dict[str, Any], ctx: Any, versions: tuple[int, ...] = (1,)) -> Path:
    """`root/models` as a server leaves it: strategy_vNNNNN.pt checkpoints + their exports."""
    import torch

    from server_app.models.export import write_export

    md = root / "models"
    md.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(versions):
        ckpt = {k: v for k, v in state.items() if not k.startswith("_")}
        ckpt["version"] = v
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        (md / f"strategy_v{v:05d}.pt").write_bytes(buf.getvalue())
        write_export(md, v, ckpt, ctx, round_id=v - 1, metrics={"large_test_acc": 0.5 + 0.1 * i})
    return md


def register(reg: Any, md: Path, versions: tuple[int, ...] = (1,)) -> None:
    """Registry rows for the checkpoints (what RegistryStore.add_model writes)."""
    from server_app.registry import crud

    with reg.session() as s:
        for v in versions:
            p = md / f"strategy_v{v:05d}.pt"
            data = p.read_bytes()
            crud.add_model_version(s, kind="large", arch="large", path=str(p), sha256=hashlib.sha256(data).hexdigest(),
                                   nbytes=len(data), metrics={"large_test_acc": 0.5}, version=v)  # fmt: skip


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max |logit difference| and argmax agreement of two [N, K] logit arrays."""
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    return {"n": int(len(ref)), "max_abs_diff": float(np.max(np.abs(ref - got))),
            "argmax_agreement": float(np.mean(ref.argmax(1) == got.argmax(1)))}  # fmt: skip
