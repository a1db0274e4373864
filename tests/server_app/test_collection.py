"""The accept decision (server_app.rounds.collection): a result must be exactly what its device
was assigned — right round, participant, model version, the tensors the plan asked for, a sane
histogram and sample count, logits on the assigned proxy rows within bounds, weights of the
assigned shapes within a bound derived from the global model. Every refusal has its stable reason."""

from __future__ import annotations

import numpy as np
import pytest

from device_firmware_py.contract import Assignment, ContractError, Result, TrainingPlan
from server_app.rounds.collection import LOGIT_BOUND, Collection, Expectation, check_result

C = 10
DIGEST = "ab" * 32
W0 = [np.full((3, 3), 0.5, np.float32), np.zeros(3, np.float32)]


def _assign(upload=("logits",), idx=None, weights=None, version=3) -> Assignment:
    return Assignment(4, "d1", "cnn_small", version, TrainingPlan(upload=upload), proxy_indices=idx, weights=weights)


def _result(**over) -> Result:
    r = {"round_id": 4, "device_id": "d1", "arch": "cnn_small", "num_samples": 20, "model_version": 3,
         "label_histogram": [2] * C, "proxy_digest": DIGEST, "proxy_logits": np.zeros((5, C), np.float32)}  # fmt: skip
    r.update(over)
    return Result(**r)


def _expect(a: Assignment, **kw) -> Expectation:
    return Expectation.from_assignment(a, num_classes=C, proxy_size=kw.pop("proxy_size", 5), proxy_digest=DIGEST, **kw)


def _reason(r: Result, e: Expectation) -> str:
    with pytest.raises(ContractError) as exc:
        check_result(r, e)
    return exc.value.reason


def test_expectation_from_assignment():
    e = _expect(_assign(idx=np.array([1, 4, 9])), proxy_size=1000)
    assert e.logits_rows == 3 and e.upload == frozenset({"logits"}) and e.weight_shapes is None
    assert _expect(_assign(), proxy_size=1000).logits_rows == 1000  # no subset: the whole proxy set
    ew = _expect(_assign(upload=("weights",), weights=W0))
    assert ew.logits_rows is None and ew.weight_shapes == ((3, 3), (3,)) and ew.weight_bound == 50.0
    # weights asked without sending any (first round): shapes from the fleet's model zoo
    ez = _expect(_assign(upload=("weights",)), weight_shapes=[(3, 3), (3,)])
    assert ez.weight_shapes == ((3, 3), (3,))


def test_honest_results_pass():
    check_result(_result(), _expect(_assign()))
    check_result(_result(proxy_logits=np.zeros((3, C), np.float32)), _expect(_assign(idx=np.array([0, 2, 4])), proxy_size=99))
    check_result(_result(proxy_logits=None, weights=[w * 3 for w in W0]), _expect(_assign(upload=("weights",), weights=W0)))
    check_result(_result(proxy_logits=None), _expect(_assign(upload=())))


@pytest.mark.parametrize(
    "over,reason",
    [
        ({"model_version": 2}, "stale_version"),
        ({"arch": "mlp_tiny"}, "plan_mismatch"),
        ({"proxy_digest": "cd" * 32}, "bad_digest"),
        ({"proxy_logits": None}, "plan_mismatch"),  # the plan asked for logits
        ({"weights": [np.zeros((3, 3), np.float32), np.zeros(3, np.float32)]}, "plan_mismatch"),  # not asked for
        ({"num_samples": 0, "label_histogram": [0] * C}, "out_of_bounds"),
        ({"label_histogram": None}, "bad_histogram"),
        ({"label_histogram": [2] * (C - 1)}, "bad_histogram"),
        ({"label_histogram": [3] * C}, "bad_histogram"),  # sums to 30, num_samples 20
        ({"label_histogram": [-2, 6] + [2] * (C - 2)}, "bad_field"),  # negative: refused by the schema already
        ({"proxy_logits": np.zeros((4, C), np.float32)}, "bad_shape"),
        ({"proxy_logits": np.zeros((5, C - 1), np.float32)}, "bad_shape"),
        ({"proxy_logits": np.full((5, C), LOGIT_BOUND * 2, np.float32)}, "out_of_bounds"),
    ],
)
def test_result_refusals(over, reason):
    if reason == "bad_field":
        with pytest.raises(ContractError) as exc:
            _result(**over)
        assert exc.value.reason == reason
        return
    assert _reason(_result(**over), _expect(_assign())) == reason


def test_weight_refusals():
    e = _expect(_assign(upload=("weights",), weights=W0))
    ok = dict(proxy_logits=None)
    assert _reason(_result(**ok, weights=[np.zeros((3, 4), np.float32), np.zeros(3, np.float32)]), e) == "bad_shape"
    assert _reason(_result(**ok, weights=[W0[0] * 1e36, W0[1]]), e) == "out_of_bounds"  # poisoned weights
    assert _reason(_result(**ok, weights=None), e) == "plan_mismatch"


def test_collection_check_round_and_participant_then_expectation():
    a = _assign()
    col = Collection(round_id=4, expect={"d1": _expect(a)}, deadline=2e9)
    assert col.participants == frozenset({"d1"})
    col.check(_result())
    for r, reason in [
        (_result(round_id=5), "wrong_round"),
        (_result(device_id="d2"), "unknown_device"),
        (_result(model_version=0), "stale_version"),
    ]:
        with pytest.raises(ContractError) as exc:
            col.check(r)
        assert exc.value.reason == reason
    assert not col.expired(now=1e9) and col.expired(now=3e9)


def test_collection_add_after_close_is_late():
    col = Collection(round_id=4, expect={"d1": _expect(_assign())}, deadline=2e9)
    col.closed = True
    assert not col.add(_result(), 10) and not col.results
