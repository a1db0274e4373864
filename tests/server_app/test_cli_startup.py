"""Startup failures of the `koala` command: one or two lines on stderr saying what failed and what
to do, a non-zero exit, the traceback only with `koala --debug`. Also: `--print-config | head` ends
quietly, `--db` / `--database-url` are one option everywhere, and an MQTT client pointed at a wrong
broker logs host, port and the reason."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_firmware_py.cli import CommandError
from server_app.cli import build_parser, main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path with the default koala_data/{proxy,test}.npz, no KOALA_* env."""
    for k in list(os.environ):
        if k.startswith("KOALA_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "koala_data"
    d.mkdir()
    np.savez(d / "proxy.npz", x=np.zeros((4, 8, 8, 1), np.float32))
    np.savez(d / "test.npz", x=np.zeros((4, 8, 8, 1), np.float32), y=np.arange(4))
    return d


def _fails_briefly(capsys: pytest.CaptureFixture[str], argv: list[str], *expect: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc != 0, err
    assert 1 <= len(lines) <= 2, err
    assert "Traceback" not in err
    for word in expect:
        assert word in err, err
    return err


def test_serve_missing_proxy_file(data_dir, capsys):
    (data_dir / "proxy.npz").unlink()
    _fails_briefly(capsys, ["serve", "--port", str(_closed_port())], "proxy set", "not found", "KOALA_PATHS__PROXY_PATH")


def test_serve_unreachable_database(data_dir, capsys):
    url = f"postgresql://koala@127.0.0.1:{_closed_port()}/koala"
    _fails_briefly(capsys, ["serve", "--port", str(_closed_port()), "--database-url", url], "database", "127.0.0.1",
                   "--database-url")  # fmt: skip


def test_serve_bad_database_url_and_bad_config(data_dir, capsys, monkeypatch):
    _fails_briefly(capsys, ["serve", "--db", "mysql://x/y"], "database.url")
    _fails_briefly(capsys, ["serve", "--config", "nowhere.toml"], "nowhere.toml")
    monkeypatch.setenv("KOALA_API__PORT", "eighty")
    _fails_briefly(capsys, ["serve"], "api.port", "KOALA_API__PORT")


def test_serve_wrong_broker(data_dir, capsys, monkeypatch):
    import server_app.services as services

    monkeypatch.setattr(services, "BROKER_WAIT_S", 1.5)
    port = _closed_port()
    _fails_briefly(capsys, ["serve", "--port", str(_closed_port()), "--broker", f"mqtt://127.0.0.1:{port}"],
                   f"127.0.0.1:{port}", "connection refused", "KOALA_BROKER__URL")  # fmt: skip


def test_serve_port_taken(data_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        _fails_briefly(capsys, ["serve", "--port", str(s.getsockname()[1])], "cannot listen", "--port")


def test_debug_flag_shows_the_traceback(data_dir):
    (data_dir / "test.npz").unlink()
    with pytest.raises(CommandError, match="test set"):
        main(["--debug", "serve"])


def test_unexpected_error_is_two_lines(capsys, monkeypatch):
    import server_app.commands.data as data_cmd

    def boom(args):
        raise RuntimeError("something deep\nsecond line")

    monkeypatch.setattr(data_cmd, "run", boom)
    err = _fails_briefly(capsys, ["data", "info"], "RuntimeError", "--debug")
    assert "second line" not in err


def test_demo_unknown_dataset_and_earlier_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails_briefly(capsys, ["demo", "--dataset", "imagenet"], "unknown dataset", "fashion-mnist")
    assert not (tmp_path / "demo_runs").exists()  # nothing created for a refused start
    run = tmp_path / "old"
    run.mkdir()
    (run / "results.json").write_text("{}")
    _fails_briefly(capsys, ["demo", "--dataset", "digits", "--run-dir", str(run)], "earlier run", "--resume")
    _fails_briefly(capsys, ["demo", "--dataset", "digits", "--resume", str(tmp_path / "empty")], "nothing to resume")
    assert (run / "results.json").read_text() == "{}"


def test_demo_run_dirs_are_fresh(tmp_path):
    from server_app.demo.launcher import holds_run, new_run_dir

    a, b = new_run_dir(tmp_path / "runs"), new_run_dir(tmp_path / "runs")
    assert a != b and a.parent == b.parent == tmp_path / "runs" and not holds_run(a)


@pytest.mark.parametrize("command", [["demo"], ["serve"], ["db", "current"], ["provision", "revoke", "nobody"]])
def test_db_and_database_url_are_one_option(command):
    p = build_parser()
    name = command[:1]
    rest = command[1:]
    for flag in ("--db", "--database-url"):
        args, _ = p.parse_known_args([*name, flag, "sqlite:///x.db", *rest])
        assert "sqlite:///x.db" in vars(args).values(), (flag, vars(args))


def test_print_config_into_a_closed_pipe_is_quiet(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOALA_")}
    p = subprocess.Popen([sys.executable, "-m", "server_app.cli", "serve", "--print-config"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    p.stdout.readline()
    p.stdout.close()  # `| head -1`
    err = p.stderr.read().decode()
    p.wait(60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_mqtt_client_says_why_it_cannot_connect(caplog):
    from device_firmware_py.mqtt import MqttClient

    port = _closed_port()
    c = MqttClient("t-refused", "127.0.0.1", port, reconnect_min_s=0.1, reconnect_max_s=0.4)
    with caplog.at_level(logging.DEBUG, logger="koala.mqtt"):
        assert not c.start()
        try:
            for _ in range(100):
                if c.connect_failures >= 3:
                    break
                import time

                time.sleep(0.05)
        finally:
            c.stop()
    warnings = [r.getMessage() for r in caplog.records if r.name == "koala.mqtt" and r.levelno == logging.WARNING]
    assert warnings and f"127.0.0.1:{port}" in warnings[0] and "connection refused" in warnings[0], warnings
    assert "retrying in" in warnings[0]
    assert c.connect_failures >= 3 and "connection refused" in (c.last_error or "")
    assert not any("Client is not connected" in r.getMessage() for r in caplog.records)


def test_mqtt_client_dns_failure_reason():
    from device_firmware_py.mqtt import connect_error_reason

    assert "DNS" in connect_error_reason(socket.gaierror(-2, "Name or service not known"))
    assert "timed out" in connect_error_reason(TimeoutError())
    assert "refused" in connect_error_reason(ConnectionRefusedError())
