"""Devices behind slow and broken links (issue 17, part 4): real rounds through LinkFaultProxy.

The stack is the demo's (`DemoRun`: private Mosquitto, the real server, LiteRT agents as their own
OS processes, digits 8x8x1), but each agent reaches the broker through its own fault-injecting TCP
proxy (bench/link_fault.py; harness bench/link_profiles.py, the same code `koala bench
device_class --profiles-only` measures with). What must hold after each fault: the round completes, the
registry holds exactly one accepted result per device, and the ingestor accepted each result once
(a redelivered copy is recognised as the same bytes, never counted twice).

The fast test cuts every device's link 1,000 bytes into its result upload; the slow ones run the
measured profiles (cellular with a 30 s outage mid-upload, half-open mid-upload, flapping).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.link_fault import LinkFaultProxy, LinkShape, Trigger  # noqa: E402
from bench.link_profiles import PROFILES, LinkProfile, make_field_run, measure, run_profile  # noqa: E402

pytestmark = pytest.mark.mosquitto


def _need_mosquitto() -> None:
    from server_app.transport.broker import find_mosquitto_binary

    if find_mosquitto_binary() is None:
        pytest.skip("mosquitto binary not installed")


def _assert_clean(r, rounds: int, devices: int = 2) -> None:
    """Every round completed, one accepted row per device and round, nothing accepted twice."""
    assert r.rounds_completed == rounds, r
    assert r.results_lost == 0 and r.duplicates == 0, r
    assert not any(k.startswith("rejected") for k in r.ingest_outcomes), r.ingest_outcomes
    assert all(len(d) == devices and set(d.values()) == {"accepted"} for d in r.assignments.values()), r


# ------------------------------------------------------------------------------ the proxy alone
@pytest.fixture
def echo_server():
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _echo(c: socket.socket) -> None:
    try:
        while d := c.recv(65536):
            c.sendall(d)
    except OSError:
        pass
    finally:
        c.close()


def _recv_all(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n and (d := s.recv(65536)):
        buf += d
    return buf


def test_proxy_delay_rate_and_a_cut_at_a_byte_position(echo_server):
    with LinkFaultProxy("127.0.0.1", echo_server, LinkShape(delay_s=0.05, rate_bps=2e6)) as p:
        s = socket.create_connection(("127.0.0.1", p.port))
        t0 = time.monotonic()
        s.sendall(b"x")
        assert _recv_all(s, 1) == b"x" and time.monotonic() - t0 >= 0.1  # 50 ms each way
        t0 = time.monotonic()
        threading.Thread(target=s.sendall, args=(b"y" * 50_000,), daemon=True).start()
        assert len(_recv_all(s, 50_000)) == 50_000
        assert time.monotonic() - t0 >= 0.2  # 400 kbit at 2 Mbit/s
        trig = p.arm(Trigger(b"MARK", "cut", after_bytes=100))
        s.sendall(b"a" * 50 + b"MA")  # the pattern split across two sends is still found
        time.sleep(0.2)
        s.sendall(b"RK" + b"z" * 500)
        assert _recv_all(s, 10_000) and trig.fired_at is not None
        st = p.stats()
        assert st.bytes_up == 1 + 50_000 + 50 + 4 + 100 and st.cuts == 1 and st.triggers_fired == 1


def test_proxy_outage_half_open_and_stall(echo_server):
    with LinkFaultProxy("127.0.0.1", echo_server) as p:
        p.outage(0.5)
        s = socket.create_connection(("127.0.0.1", p.port))
        assert s.recv(10) == b""  # reset at once while the link is down
        time.sleep(0.6)
        s = socket.create_connection(("127.0.0.1", p.port))
        s.sendall(b"q")
        assert s.recv(10) == b"q"
        assert p.half_open() == 1
        s.sendall(b"w")
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):  # silent, not closed
            s.recv(10)
        p.stall(0.4)
        s2 = socket.create_connection(("127.0.0.1", p.port))
        t0 = time.monotonic()
        s2.sendall(b"s")
        assert s2.recv(10) == b"s" and time.monotonic() - t0 >= 0.3  # late, not lost
        st = p.stats()
        assert (st.refused, st.half_opened, st.dropped_bytes, st.stalls) == (1, 1, 1, 1)


# ---------------------------------------------------------------------- real rounds, fast (CI)
def test_round_with_result_uploads_cut_midway(tmp_path):
    """Every device's link is reset 1,000 bytes into its result PUBLISH (the broker drops the
    half packet): paho resends it after the reconnect, the agent re-publishes it when the retained
    round status says `collecting`; the server accepts it once and recognises the copy."""
    _need_mosquitto()
    prof = LinkProfile("cut", cut_mid_upload=True)
    r = run_profile(prof, tmp_path / "run", dataset="digits", devices=2, rounds=1, proxy_size=200,
                    train_size=None, test_size=200, deadline_s=60, timeout_s=150)  # fmt: skip
    _assert_clean(r, rounds=1)
    for dev, link in r.link.items():
        assert link["triggers_fired"] == 1 and link["cuts"] == 1, (dev, link)
        assert link["connections"] >= 2, (dev, link)  # it came back on a new connection


# ---------------------------------------------------------------------- measured profiles (slow)
def _digits_profile(name: str, tmp_path: Path, rounds: int = 2):
    _need_mosquitto()
    return run_profile(PROFILES[name], tmp_path / name, dataset="digits", devices=2, rounds=rounds,
                       proxy_size=200, train_size=None, test_size=200, deadline_s=90, timeout_s=400)  # fmt: skip


@pytest.mark.slow
def test_cellular_outage_mid_upload(tmp_path):
    r = _digits_profile("cellular", tmp_path)
    _assert_clean(r, rounds=2)
    for link in r.link.values():
        assert link["outages"] == 1 and link["refused"] >= 1  # the device retried into the outage


@pytest.mark.slow
def test_half_open_mid_upload_found_by_keepalive(tmp_path):
    r = _digits_profile("half_open", tmp_path, rounds=1)
    _assert_clean(r, rounds=1)
    for link in r.link.values():
        assert link["half_opened"] == 1 and link["dropped_bytes"] > 0 and link["connections"] >= 2


@pytest.mark.slow
def test_flapping_link(tmp_path):
    """The flapping profile with a shorter period, so that several flaps land inside digits rounds."""
    _need_mosquitto()
    prof = replace(PROFILES["flapping"], flap_period_s=7.0, flap_down_s=2.0, rounds=6)
    r = run_profile(prof, tmp_path / "flap", dataset="digits", devices=2, proxy_size=200, train_size=None,
                    test_size=200, deadline_s=90, timeout_s=400)  # fmt: skip
    _assert_clean(r, rounds=6)
    assert all(link["outages"] >= 2 and link["connections"] >= 3 for link in r.link.values()), r.link


@pytest.mark.slow
def test_flapping_device_does_not_reupload_a_confirmed_result(tmp_path):
    """dev001's link is down for 30 s from 1,000 bytes into its upload, so round 0 keeps
    collecting; meanwhile dev000's link flaps every 2 s. Before the agent remembered the server's
    verdict, dev000 re-uploaded its whole result on each of ~15 reconnects and, past 8 messages,
    the server recorded `rate_limited` rejections of a result it had accepted."""
    from device_firmware_py.contract import topics

    _need_mosquitto()
    run = make_field_run(LinkProfile("storm"), tmp_path / "storm", dataset="digits", devices=2, rounds=1,
                         proxy_size=200, train_size=None, test_size=200, deadline_s=90)  # fmt: skip
    t0 = time.monotonic()
    try:
        run.start()
        pattern = topics.device_result("dev001").encode()
        run.links["dev001"].arm(Trigger(pattern, "outage", after_bytes=1000, seconds=30))
        run.links["dev000"].flap(2.0, 0.3)
        assert run.wait(timeout_s=200, progress=False)
        r = measure(run, time.monotonic() - t0)
        counts = dict(run.services.ingestor.counts)
    finally:
        run.stop()
    _assert_clean(r, rounds=1)
    assert r.link["dev000"]["connections"] >= 8, r.link["dev000"]  # it really reconnected many times
    assert r.agent_republishes["dev000"] <= 1 and not any(k.startswith("rejected") for k in counts), counts


@pytest.mark.slow
@pytest.mark.parametrize("action", ["half_open", "outage"])
def test_assignment_download_broken_midway(tmp_path, action):
    """The other direction: each device's link fails 1,000 bytes into the assignment the broker
    sends it (silent, or down for 20 s). The broker keeps the unacknowledged QoS 1 assignment in
    the device's persistent session and sends it again on the device's next connection."""
    from device_firmware_py.contract import topics

    _need_mosquitto()
    run = make_field_run(LinkProfile(f"assign-{action}"), tmp_path / action, dataset="digits", devices=2, rounds=2,
                         proxy_size=200, train_size=None, test_size=200, deadline_s=90)  # fmt: skip
    t0 = time.monotonic()
    try:
        run.start()
        for dev, link in run.links.items():
            pattern = topics.device_assign(dev).encode()
            link.arm(Trigger(pattern, action, direction="down", after_bytes=1000, seconds=20))
        assert run.wait(timeout_s=300, progress=False)
        r = measure(run, time.monotonic() - t0)
    finally:
        run.stop()
    _assert_clean(r, rounds=2)
    assert all(link["triggers_fired"] == 1 and link["connections"] >= 2 for link in r.link.values()), r.link
