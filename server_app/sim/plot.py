"""PNG of test accuracy per round per method (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    cmap = plt.get_cmap("tab20")
    for i, (name, rows) in enumerate(curves.items()):
        style: dict[str, Any] = {"color": cmap(i % 20), "linestyle": "-" if i < 10 else "-."}
        xs = [r["round"] + 1 for r in rows]
        large = [r.get("large_test_acc") for r in rows]
        if any(v is not None for v in large):
            ax.plot(xs, [v if v is not None else float("nan") for v in large], marker="o", label=f"{name} (large)", **style)
        else:
            small = [r.get("small_test_acc_mean") for r in rows]
            style["linestyle"] = "--"
            ax.plot(xs, small, marker="x",  # type: ignore[arg-type]  # rows may hold None (the stub wants numbers)
                    label=f"{name} (small, device mean)", **style)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
