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


def test_bad_counts_name_the_flag_before_anything_starts(tmp_path, capsys, monkeypatch) -> None:
    """Issue 29: `koala demo --devices 0` said "ValueError ... unexpected" after starting a broker, and
    `koala sim --rounds -1` a validation error that named no field. Both now name the flag, exit 2
    and start nothing (no run dir is created)."""
    from server_app.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--devices", "0"]) == 2
    assert "koala demo: --devices 0: must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--rounds", "-1", "--dataset", "digits"]) == 2
    assert "koala demo: --rounds -1: must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--round-timeout", "0", "--dataset", "digits"]) == 2
    assert "--round-timeout 0.0: must be > 0" in capsys.readouterr().err
    assert main(["sim", "--rounds", "-1", "--dataset", "digits"]) == 2
    assert "koala sim: --rounds -1: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo_runs").exists() and not any(tmp_path.iterdir())


def test_ctrl_c_says_it_is_stopping() -> None:
    """Issue 29: Ctrl-C was silent for the 15-40 s a demo takes to stop its agents, server and broker.
    stop_on_signals (demo, sim, monitor, bench; serve through uvicorn's handler) says so at once; a
    second Ctrl-C forces the exit."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import time\nfrom server_app.commands import stop_on_signals\nstop_on_signals('koala demo')\n"
            "print('ready', flush=True)\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            "    print('cleaning up', flush=True)\n    time.sleep(60)\n")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGINT)
    assert p.stdout.readline() == "cleaning up\n"
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)  # again: forced
    out, err = p.communicate(timeout=20)
    assert p.returncode == 130
    assert "koala demo: stopping (Ctrl-C again to force)..." in err and "forced stop" in err, err
