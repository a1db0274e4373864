"""research/rkd_headroom.py: the distillation probe runs both ways (fixed teacher labels, server-side
mixup labelled by the teacher) and reports what its table needs; the grids are well formed."""

from __future__ import annotations

import torch

from research import rkd_headroom as rh


def test_distil_fixed_and_mixup_report_accuracy_curve_and_agreement():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    px = torch.rand(64, 28, 28, 1)
    xt, yt = torch.rand(40, 28, 28, 1), torch.randint(0, 10, (40,))
    for mixup in (False, True):
        r = rh._distil(teacher, px, epochs=2, mixup=mixup, online=False, seed=0, xt=xt, yt=yt, batch=32)
        assert 0.0 <= r["large_test_acc"] <= 1.0 and 0.0 <= r["test_agreement_with_teacher"] <= 1.0
        assert [e for e, _ in r["curve"]] == [1, 2]  # first, middle (= epochs // 2 + 1 = 2), last epoch
        assert r["large_test_acc"] == r["curve"][-1][1]


def test_grids_name_proxy_epochs_and_levers():
    assert set(rh.GRIDS) == {"full", "cpu", "quick"}
    for rows in rh.GRIDS.values():
        assert all(p > 0 and e > 0 and isinstance(m, bool) and isinstance(o, bool) for p, e, m, o in rows)
    assert (5000, 20, False, False) in rh.GRIDS["cpu"]  # today's proxy, the baseline row


def test_recipes_run_every_lever_and_score_the_weight_average():
    """research/rkd_recipes.py: each lever (schedule, temperature, batch, EMA) runs the loop's
    round structure and returns an accuracy; the EMA row scores its averaged weights too."""
    from research import rkd_recipes as rr

    torch.manual_seed(0)
    px, tl = torch.rand(48, 28, 28, 1), torch.randn(48, 10)
    xt, yt = torch.rand(20, 28, 28, 1), torch.randint(0, 10, (20,))
    for name in ("const", "cos_T3", "const_ema", "b64"):
        r = rr.distil(px, tl, xt, yt, rounds=2, epochs=1, **{k: v for k, v in rr.RECIPES[name].items() if k != "epochs"})
        assert 0.0 <= r["acc"] <= 1.0
        assert ("ema_acc" in r) == (name == "const_ema")
    assert rr.RECIPES["const"] == {}  # the deployed loop's recipe is the baseline row
