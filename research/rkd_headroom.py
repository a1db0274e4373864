"""Reverse-KD headroom (issue 15): can the large model end ABOVE the small model it learns from,
and what does it take — proxy size, epochs, server-side augmentation?

Why: in every full-scale homo run KOALA's large model ends 0.5–1.4 pt below its own teacher (the
averaged cnn_small) though it agrees with it on ~98 % of the proxy. That is what a student trained
on a teacher's labels of only 5,000 images does; the question is which lever moves it. Measured
here in isolation, without the federated loop: a fixed teacher (the cnn_small architecture, torch
twin of the device model, trained centrally to about KOALA's teacher accuracy), a fresh width-16
large model distilled from it, test accuracy of both on the full Fashion-MNIST test set.

Levers (each a row):
- proxy images P (5,000 = today; 10,000; 20,000; all 55,000 non-test training images, unlabeled);
- epochs E over them;
- `mixup`: every batch is a mixup of proxy images (Beta(0.4, 0.4)), labelled by the teacher on the
  mixed image — possible in KOALA homo without any device cost, since the server holds the
  averaged small model (it computes its proxy logits with the same LiteRT runtime);
- the teacher's labels fixed (computed once, as the deployed server does) or queried per batch.

Runs on CUDA when present (the device tool's H200), else on the CPU (`--quick` there).
`python -m research.rkd_headroom [--quick] [--device cuda]` -> research/results/rkd_headroom.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "research" / "results" / "rkd_headroom.json"
# (proxy images, epochs, mixup, teacher queried per batch): "full" on a GPU; "cpu" the levers that
# matter at a CPU's budget (2 shared cores here: ~15 min); "quick" a smoke run
GRIDS: dict[str, list[tuple[int, int, bool, bool]]] = {
    "full": [(5000, 4, False, False), (5000, 20, False, False), (5000, 20, True, False), (5000, 60, True, False),
             (15000, 20, False, False), (25000, 20, False, False), (25000, 20, True, False), (55000, 20, False, False),
             (55000, 20, True, False), (55000, 40, True, False)],
    "cpu": [(5000, 4, False, False), (5000, 20, False, False), (5000, 20, True, False), (25000, 8, False, False),
            (25000, 8, True, False)],
    "quick": [(2000, 2, False, False), (2000, 2, True, False)],
}  # fmt: skip


def _teacher(x: np.ndarray, y: np.ndarray, dev: torch.device, target: float, xt: torch.Tensor, yt: torch.Tensor,
             seed: int) -> tuple[torch.nn.Module, float, int]:  # fmt: skip
    """cnn_small (the device architecture) trained centrally until its test accuracy reaches
    `target` (KOALA's homo teacher ends 0.86-0.88 at full scale) or 30 epochs."""
    from bench.torch_nets import build_twin

    man = json.loads((ROOT / "device_firmware_py" / "artifacts" / "cnn_small_28x28x1.json").read_text())
    torch.manual_seed(seed)
    net = build_twin(man).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xs, ys = torch.from_numpy(x).to(dev), torch.from_numpy(y).long().to(dev)
    gen = torch.Generator().manual_seed(seed)
    acc = 0.0
    for ep in range(1, 31):
        net.train()
        perm = torch.randperm(len(xs), generator=gen).to(dev)
        for i in range(0, len(xs), 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(net(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = _acc(net, xt, yt)
        if acc >= target:
            return net, acc, ep
    return net, acc, 30


@torch.no_grad()
def _acc(net: torch.nn.Module, xt: torch.Tensor, yt: torch.Tensor) -> float:
    net.eval()
    hits = sum(int((net(xt[i : i + 2000]).argmax(1) == yt[i : i + 2000]).sum()) for i in range(0, len(xt), 2000))
    return hits / len(xt)


def _distil(teacher: torch.nn.Module, px: torch.Tensor, epochs: int, mixup: bool, online: bool, seed: int,
            xt: torch.Tensor, yt: torch.Tensor, batch: int = 256, lr: float = 1e-3) -> dict[str, Any]:  # fmt: skip
    """A fresh width-16 large model distilled from `teacher` on `px` (T = 1, KL, Adam: what
    engine.distill.reverse_distill does), optionally on mixed images labelled by the teacher."""
    from server_app.models.large import LargeCNN

    torch.manual_seed(seed)
    large = LargeCNN(tuple(px.shape[1:]), 10, width=16).to(px.device)
    opt = torch.optim.Adam(large.parameters(), lr=lr)
    teacher.eval()
    with torch.no_grad():
        fixed = torch.cat([F.softmax(teacher(px[i : i + 4096]), 1) for i in range(0, len(px), 4096)])
    gen = torch.Generator().manual_seed(seed)
    beta = torch.distributions.Beta(torch.tensor(0.4), torch.tensor(0.4))
    curve = []
    for _ep in range(epochs):
        large.train()
        perm = torch.randperm(len(px), generator=gen).to(px.device)
        for i in range(0, len(px), batch):
            idx = perm[i : i + batch]
            xb = px[idx]
            if mixup:
                lam = beta.sample((len(idx), 1, 1, 1)).to(px.device)
                xb = lam * xb + (1 - lam) * xb[torch.randperm(len(idx), generator=gen).to(px.device)]
            if mixup or online:
                with torch.no_grad():
                    q = F.softmax(teacher(xb), 1)
            else:
                q = fixed[idx]
            loss = F.kl_div(F.log_softmax(large(xb), 1), q, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if _ep in (0, epochs // 2, epochs - 1):
            curve.append((_ep + 1, _acc(large, xt, yt)))
    with torch.no_grad():
        large.eval()
        agree = float((large(xt[:5000]).argmax(1) == teacher(xt[:5000]).argmax(1)).float().mean())
    return {"large_test_acc": curve[-1][1], "curve": curve, "test_agreement_with_teacher": agree}


def run(quick: bool, device: str, out: Path, seeds: tuple[int, ...], data_dir: str | None = None) -> dict[str, Any]:
    from server_app.data.datasets import load_dataset

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ds = load_dataset("fashion-mnist", data_dir, seed=0)
    x, y = np.ascontiguousarray(ds.x_train, np.float32), np.asarray(ds.y_train)
    xt = torch.from_numpy(np.ascontiguousarray(ds.x_test, np.float32)).to(dev)
    yt = torch.from_numpy(np.asarray(ds.y_test)).long().to(dev)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    # the teacher's own training images (KOALA: the devices' private data), the rest unlabeled proxy
    teach_idx, pool = order[:30000], order[30000:] if not quick else order[30000:36000]
    grid = GRIDS["quick" if quick else ("full" if dev.type == "cuda" else "cpu")]
    rows: list[dict[str, Any]] = []
    t0 = time.time()

    def save() -> dict[str, Any]:  # after every row: a run cut short keeps what it measured
        doc = {"name": "rkd_headroom", "quick": quick, "device": str(dev),
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
               "config": {"teacher": "cnn_small (torch twin), central training on 30,000 images until test acc >= 0.87",
                          "student": "LargeCNN width 16, fresh", "kd": "T=1 KL, Adam 1e-3, batch 256",
                          "proxy": "unlabeled training images not used by the teacher first, then the teacher's own"},
               "rows": rows, "wall_s": time.time() - t0,
               "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        return doc

    for seed in seeds:
        teacher, t_acc, t_ep = _teacher(x[teach_idx], y[teach_idx], dev, 0.87 if not quick else 0.6, xt, yt, seed)
        print(f"seed {seed}: teacher cnn_small test acc {t_acc:.4f} after {t_ep} epochs", flush=True)
        for p, epochs, mixup, online in grid:
            # P proxy images: from the unlabeled pool, then (above its 25,000) the teacher's own images
            src = np.concatenate([pool, teach_idx])[:p]
            px = torch.from_numpy(x[src]).to(dev)
            t1 = time.time()
            r = _distil(teacher, px, epochs, mixup, online, seed, xt, yt)
            row = {"seed": seed, "proxy": int(len(src)), "epochs": epochs, "mixup": mixup, "online_teacher": online,
                   "teacher_test_acc": t_acc, **r, "above_teacher_pt": 100 * (r["large_test_acc"] - t_acc),
                   "wall_s": time.time() - t1}  # fmt: skip
            rows.append(row)
            print(f"  P={row['proxy']:>6} E={epochs:>3} mixup={mixup!s:5} -> large {r['large_test_acc']:.4f} "
                  f"({row['above_teacher_pt']:+.2f} pt vs teacher), agree {r['test_agreement_with_teacher']:.3f}, "
                  f"{row['wall_s']:.0f} s", flush=True)  # fmt: skip
            save()
    return save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.rkd_headroom", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny grid (CPU smoke)")
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto")
    ap.add_argument("--seeds", default="0", help="comma list of teacher/student seeds")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: the Debian package's)")
    a = ap.parse_args(argv)
    run(a.quick, a.device, a.out, tuple(int(s) for s in a.seeds.split(",")), a.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
