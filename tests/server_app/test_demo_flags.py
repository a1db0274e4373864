"""`koala demo` flags -> the DemoConfig it runs: the full-scale reproduction in the README needs
--train-size 0 / --test-size 0 (all images) and --torch-threads (the tables' thread count)."""

from __future__ import annotations

import argparse

import pytest

from server_app.commands import demo


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo.configure(p)
    return p.parse_args(list(argv))


def test_defaults_and_full_scale_flags_reach_the_demo_config(tmp_path) -> None:
    a = _args("--run-dir", str(tmp_path / "r"))
    cfg = demo.demo_config(a, demo.demo_policy(a))
    assert cfg.torch_threads == 2 and cfg.train_size == 6000 and cfg.test_size == 2000
    a = _args("--run-dir", str(tmp_path / "r"), "--devices", "20", "--mode", "hetero", "--train-size", "0",
              "--test-size", "0", "--proxy-size", "5000", "--rounds", "10", "--seed", "2", "--torch-threads", "1")  # fmt: skip
    policy = demo.demo_policy(a)
    cfg = demo.demo_config(a, policy)
    assert (cfg.torch_threads, cfg.train_size, cfg.test_size, cfg.proxy_size, cfg.devices) == (1, None, None, 5000, 20)
    assert policy.archs == ["mlp_tiny", "cnn_small", "mobilenet_micro"] and policy.seed == 2 and policy.rounds == 10


def test_torch_threads_below_one_is_refused(tmp_path, capsys) -> None:
    from device_firmware_py.cli import CommandError

    a = _args("--run-dir", str(tmp_path / "r"), "--torch-threads", "0")
    with pytest.raises(CommandError, match="torch-threads"):
        demo.run(a)
