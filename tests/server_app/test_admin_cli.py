"""`koala rounds` and `koala devices`: the operator CLI over a real HTTP server (uvicorn) running the
REST API on a seeded registry; token from a file; failures are one line with a non-zero exit."""

from __future__ import annotations

from typing import Any

import pytest
from api_fixtures import RegistryServices, seed, served_app

from server_app.registry import Registry


class _Orchestrator:
    """The RoundControl operations the API calls, recorded."""

    def __init__(self) -> None:
        self.policy: dict[str, Any] = {"auto": True, "rounds": 10, "min_devices": 2, "interval_s": 0.0}
        self.started = 0

    def start_round(self, **_: Any) -> int:
        self.started += 1
        return 2

    def stop_round(self, round_id: int | None = None, reason: str = "") -> int:
        raise RuntimeError("no round is running")

    def schedule_policy(self) -> dict[str, Any]:
        return dict(self.policy)

    def set_schedule_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        self.policy.update(policy)
        return dict(self.policy)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from server_app.api.app import create_app

    d = tmp_path_factory.mktemp("admin-cli")
    reg = Registry(f"sqlite:///{d / 'koala.db'}")
    reg.upgrade()
    seed(reg, d)
    orch = _Orchestrator()
    with served_app(create_app(RegistryServices(reg, orchestrator=orch)), d) as (url, token_file):
        yield url, str(token_file), orch
    reg.dispose()


def _koala(capsys, *argv: str) -> tuple[int, str, str]:
    from server_app.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_rounds_and_devices_over_rest(api, capsys):
    url, token, orch = api
    opts = ("--api", url, "--token-file", token)
    rc, out, _ = _koala(capsys, "rounds", "ls", *opts)
    assert rc == 0 and out.splitlines()[0].split()[:2] == ["id", "state"]
    assert any(line.split()[:2] == ["0", "completed"] for line in out.splitlines())
    assert any(line.split()[:2] == ["1", "collecting"] for line in out.splitlines())
    rc, out, _ = _koala(capsys, "rounds", "show", "0", *opts)
    assert rc == 0 and "0.7100" in out and "bad_digest" in out  # large_test_acc and dev-b's rejection
    rc, out, _ = _koala(capsys, "rounds", "start", *opts)
    assert rc == 0 and orch.started == 1
    rc, out, _ = _koala(capsys, "rounds", "schedule", "--no-auto", "--interval", "2.5", *opts)
    assert rc == 0 and orch.policy["auto"] is False and orch.policy["interval_s"] == 2.5
    rc, out, _ = _koala(capsys, "devices", "ls", *opts)
    assert rc == 0 and {"dev-a", "dev-b", "dev-c"} <= {ln.split()[0] for ln in out.splitlines()[1:]}
    rc, out, _ = _koala(capsys, "devices", "revoke", "dev-c", *opts)
    assert rc == 0 and "dev-c: revoked" in out
    rc, out, _ = _koala(capsys, "devices", "ls", *opts)
    assert "dev-c" not in {ln.split()[0] for ln in out.splitlines()[1:]}
    rc, out, _ = _koala(capsys, "devices", "readmit", "dev-c", "--json", *opts)
    assert rc == 0 and "'revoked': False" in out


def test_failures_are_one_line(api, capsys, tmp_path):
    url, token, _ = api
    rc, _, err = _koala(capsys, "rounds", "stop", "--api", url, "--token-file", token)
    assert rc != 0 and "409" in err and len(err.strip().splitlines()) <= 2
    rc, _, err = _koala(capsys, "devices", "ls", "--api", url, "--token-file", str(tmp_path / "none"))
    assert rc != 0 and "token file" in err and len(err.strip().splitlines()) <= 2
    rc, _, err = _koala(capsys, "rounds", "ls", "--api", url)  # no token: the API refuses
    assert rc != 0 and "bearer token" in err and len(err.strip().splitlines()) <= 2
    rc, _, err = _koala(capsys, "rounds", "ls", "--api", "http://127.0.0.1:1", "--token-file", token)
    assert rc != 0 and "cannot reach" in err and len(err.strip().splitlines()) <= 2


def test_rounds_wait(api, capsys):
    """`koala rounds wait`: returns with the table once enough rounds are in the state; a timeout
    (or a server that never answers) is exit 1 with one line naming what it waited for."""
    url, token, _ = api
    opts = ("--api", url, "--token-file", token)
    rc, out, _ = _koala(capsys, "rounds", "wait", *opts, "--timeout", "10")
    assert rc == 0 and any(line.split()[:2] == ["0", "completed"] for line in out.splitlines())
    rc, _, err = _koala(capsys, "rounds", "wait", *opts, "--state", "failed", "--timeout", "1")
    assert rc == 1 and "no 1 round(s) failed within 1 s" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _koala(capsys, "rounds", "wait", "--api", "http://127.0.0.1:1", "--token-file", token, "--timeout", "1")
    assert rc == 1 and "cannot reach" in err and len(err.strip().splitlines()) == 1


def test_run_dir_gives_the_demos_api_and_token(api, capsys, tmp_path, monkeypatch):
    """Issue 29: after `koala demo`, `koala rounds ls` needed --api (the port had to be guessed). The
    demo writes run.json; --run-dir DIR reads the API URL and the token file from it, and with no
    --api at all the newest live demo under ./demo_runs is used (said on stderr). A stopped demo's
    run dir is one line saying so and how to read its results offline."""
    from server_app.demo.run_file import mark_stopped, write_run_file

    url, token, _ = api
    run = tmp_path / "demo_runs" / "20250101-000000"
    run.mkdir(parents=True)
    write_run_file(run, api_url=url, broker_url="mqtt://127.0.0.1:1", token_file=token)  # this pid: alive
    rc, out, _ = _koala(capsys, "rounds", "ls", "--run-dir", str(run))
    assert rc == 0 and out.splitlines()[0].split()[:2] == ["id", "state"]
    rc, out, _ = _koala(capsys, "devices", "ls", "--run-dir", str(run))
    assert rc == 0 and "dev" in out
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOALA_API_URL", raising=False)
    rc, out, err = _koala(capsys, "rounds", "ls")  # no --api, no --run-dir: the live demo
    assert rc == 0 and f"using the demo running in demo_runs/{run.name}" in err and url in err
    mark_stopped(run)
    rc, out, err = _koala(capsys, "rounds", "ls", "--run-dir", str(run))
    assert rc == 1 and "has stopped" in err and f"--data-dir {run}/server" in err
    rc, _, err = _koala(capsys, "rounds", "ls", "--run-dir", str(tmp_path))
    assert rc == 1 and "no run.json in" in err
