"""The one policy: each field reaches the strategy and the device plan unchanged; fields a
strategy cannot use are errors; participant sampling is seeded and fair; old formats are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from device_firmware_py.contract import codec
from device_firmware_py.contract.errors import ContractError
from device_firmware_py.contract.messages import Assignment
from device_firmware_py.contract.plan import TrainingPlan
from server_app.engine.strategies import build_strategy
from server_app.engine.strategy import ParticipantSampler, quorum_for
from server_app.engine.types import DeviceInfo
from server_app.policy import KoalaPolicy, PolicyError, read_policy_file

# policy field -> (a non-default value, how to read it back from the decoded assignment the device gets)
DEVICE_FIELDS = {
    "local_epochs": (3, lambda a: a.plan.local_epochs),
    "lr": (0.004, lambda a: a.plan.lr),
    "fkd_epochs": (2, lambda a: a.plan.fkd_epochs),
    "fkd_lr": (0.002, lambda a: a.plan.fkd_lr),
    "post_fkd_epochs": (1, lambda a: a.plan.post_fkd_epochs),
    "temperature": (2.5, lambda a: a.plan.temperature),
    "proxy_per_round": (7, lambda a: len(a.proxy_indices)),
    "logits_dtype": ("float16", lambda a: a.plan.logits_dtype),
}


class _Small:
    """Stands in for the server-side LiteRT model (only get_weights is used by configure_round)."""

    def get_weights(self):
        return [np.zeros((3, 2), np.float32)]


def _strategy(**policy):
    import torch

    from server_app.models.large import build_large

    torch.manual_seed(0)
    large = build_large((8, 8, 1), 10, width=2, fc=8)
    pol = KoalaPolicy.model_validate(policy)
    return build_strategy(pol, large=large, proxy_x=np.random.default_rng(0).random((20, 8, 8, 1), np.float32),
                          small_factory=lambda arch: _Small())  # fmt: skip


def _devices(n: int) -> list[DeviceInfo]:
    return [DeviceInfo(f"d{i}", "cnn_small", 10, [1] * 10) for i in range(n)]


@pytest.mark.parametrize("field", sorted(DEVICE_FIELDS))
def test_each_policy_field_reaches_the_device_unchanged(field, tmp_path):
    value, read = DEVICE_FIELDS[field]
    f = tmp_path / "policy.toml"
    f.write_text(f"[policy]\n{field} = {json.dumps(value)}\n")
    s = _strategy(**read_policy_file(f))
    assert getattr(s.policy, field) == value  # file -> policy -> strategy
    a = s.configure_round(1, _devices(2))[0]
    wire = codec.decode_frame(codec.encode_frame(a), Assignment)  # what the device decodes
    assert read(wire) == value
    if field == "proxy_per_round":
        assert np.array_equal(wire.proxy_indices, s.proxy_subset(1))
        assert wire.teacher_logits.shape == (value, 10)


def test_server_side_fields_reach_the_strategy():
    s = _strategy(rkd_epochs=7, rkd_lr=0.01, rkd_batch=16, anchor_lambda=0.1, fusion="median", teacher="device_logits",
                  seed=3, participants=0.5, quorum_fraction=0.75)  # fmt: skip
    p = s.policy
    assert (p.rkd_epochs, p.rkd_lr, p.rkd_batch, p.anchor_lambda, p.fusion) == (7, 0.01, 16, 0.1, "median")
    assert s.teacher == "device_logits" and s.sampler.participants == 0.5
    assert s.quorum(4) == 3  # ceil(0.75 * 4)


def test_fields_the_strategy_cannot_use_are_errors():
    with pytest.raises(PolicyError, match="fusion"):
        _strategy(strategy="koala_homo", fusion="mean")  # avg_model, one arch: one teacher, nothing to fuse
    with pytest.raises(PolicyError, match="rkd_epochs"):
        build_strategy(KoalaPolicy(strategy="local_only", rkd_epochs=3))
    with pytest.raises(ValueError, match="unknown strategy"):
        KoalaPolicy(strategy="koala_homoo")
    with pytest.raises(ValueError, match="exactly one architecture"):
        KoalaPolicy(strategy="koala_homo", archs=["cnn_small", "mlp_tiny"])
    with pytest.raises(ValueError):
        KoalaPolicy(local_epochs=-1)


def test_defaults_are_the_measured_best_setting():
    p = KoalaPolicy()
    assert (p.strategy, p.local_epochs, p.fkd_epochs, p.rkd_epochs, p.proxy_per_round, p.fusion) == (
        "koala_homo", 5, 1, 4, None, "class_aware")


def test_participant_sampling_is_seeded_and_fair():
    devs = _devices(10)
    a, b = ParticipantSampler(3, seed=1), ParticipantSampler(3, seed=1)
    rounds_a = [[d.device_id for d in a.sample(r, devs)] for r in range(10)]
    assert rounds_a == [[d.device_id for d in b.sample(r, devs)] for r in range(10)]  # seeded
    assert all(len(r) == 3 for r in rounds_a)
    counts = list(a.picked.values())
    assert len(counts) == 10 and max(counts) - min(counts) <= 1  # fair: 30 picks over 10 devices, 3 each
    assert ParticipantSampler(0.25, 0).count(10) == 3 and ParticipantSampler(None, 0).count(10) == 10
    assert quorum_for(5, 0.5) == 3 and quorum_for(1, 0.1) == 1


def test_old_or_unknown_formats_are_rejected_with_a_contract_reason():
    a = Assignment(round_id=1, device_id="d1", arch="cnn_small", plan=TrainingPlan(local_epochs=2))
    frame = bytearray(codec.encode_frame(a))
    frame[4] = 1  # a version-1 frame (free-form hyper dict)
    with pytest.raises(ContractError) as e:
        codec.decode_frame(bytes(frame))
    assert e.value.reason == "bad_version"
    with pytest.raises(ContractError) as e:
        TrainingPlan.from_wire({**TrainingPlan().to_wire(), "version": 2})
    assert e.value.reason == "bad_version"
    with pytest.raises(ContractError) as e:
        TrainingPlan.from_wire({**TrainingPlan().to_wire(), "kd_epochs": 3})
    assert e.value.reason == "bad_field"
    with pytest.raises(ContractError) as e:
        Assignment(round_id=1, device_id="d1", arch="cnn_small", proxy_indices=np.array([3, 1]))
    assert e.value.reason == "bad_field"  # unsorted subset
