"""What Mosquitto does with a shared subscription's messages when a member dies (issue 18, item 3).

The experiment behind docs/mqtt-sessions.md, kept as a test so a broker upgrade that changes the
behaviour is noticed. Two members of `$share/g/koala/test/#` (QoS 1, paho, manual PUBACK): member
A is a separate process that receives messages and never acknowledges them, then is SIGKILLed (no
DISCONNECT, its socket just closes). Member B stays. Questions, each answered by an assertion:

1. Does the broker hand A's delivered-but-unacknowledged messages to B when A dies?
2. While A is gone, does the broker keep dealing new messages to A's session, or only to B?
3. When A comes back with the same client id, does it get what was kept for it?
Run once for a clean session (clean_session=True) and once for a persistent one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.mosquitto

TOPIC = "koala/test/results"
SHARE = f"$share/g/{TOPIC}"

MEMBER_A = textwrap.dedent(
    """
    import json, sys, time
    import paho.mqtt.client as mqtt
    port, clean, out = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
    got = []
    def on_message(c, u, m):
        got.append(int(m.payload))  # never acknowledged (manual_ack)
        with open(out, "w") as f:
            json.dump(got, f)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="member-a", clean_session=clean, manual_ack=True)
    c.on_message = on_message
    c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(sys.argv[4], qos=1)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_forever()
    """
)


class Member:
    """An in-process member that acknowledges everything and records what it got."""

    def __init__(self, port: int, client_id: str, clean: bool, ack: bool = True):
        import paho.mqtt.client as mqtt

        self.got: list[int] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a, **k: self.ready.set()
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(SHARE, qos=1)
        self.c.connect("127.0.0.1", port, keepalive=60)
        self.c.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, c, u, m) -> None:
        with self.lock:
            self.got.append(int(m.payload))

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _publish(port: int, values: range) -> None:
    import paho.mqtt.client as mqtt

    p = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{values.start}")
    p.connect("127.0.0.1", port)
    p.loop_start()
    for v in values:
        p.publish(TOPIC, str(v), qos=1).wait_for_publish(10)
    p.disconnect()
    p.loop_stop()


def _wait(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def run_experiment(port: int, workdir: Path, clean: bool) -> dict[str, list[int]]:
    out = workdir / f"a-{int(clean)}.json"
    a = subprocess.Popen([sys.executable, "-c", MEMBER_A, str(port), "1" if clean else "0", str(out), SHARE])
    b = Member(port, "member-b", clean=True)
    try:
        time.sleep(1.0)  # A subscribed too
        _publish(port, range(0, 20))
        assert _wait(lambda: out.exists() and len(json.loads(out.read_text() or "[]")) + len(b.got) >= 20)
        a_unacked = sorted(json.loads(out.read_text()))
        b_first = sorted(b.got)
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        time.sleep(1.5)  # the broker notices the closed socket
        _publish(port, range(100, 120))  # published while A is gone
        _wait(lambda: len(b.got) >= len(b_first) + 20 + len(a_unacked), timeout=5.0)
        time.sleep(1.0)
        b_after = sorted(set(b.got) - set(b_first))
        # A comes back with the same client id: what does its session hold?
        back = Member(port, "member-a", clean=clean)
        time.sleep(2.0)
        a_back = sorted(back.got)
        back.stop()
    finally:
        if a.poll() is None:
            a.kill()
        b.stop()
    return {"a_unacked": a_unacked, "b_first": b_first, "b_after_kill": b_after, "a_on_return": a_back}


@pytest.mark.parametrize("clean", [True, False], ids=["clean_session", "persistent_session"])
def test_shared_subscription_after_a_member_dies(mosquitto_broker, tmp_path, clean, record_property) -> None:
    r = run_experiment(mosquitto_broker.port, tmp_path, clean)
    record_property("experiment", json.dumps(r))
    print(f"\nclean_session={clean}: {json.dumps(r)}")
    assert r["a_unacked"], "member A got a share of the first 20 messages (the broker deals round-robin)"
    lost_or_kept = set(r["a_unacked"])
    later = set(range(100, 120))
    if clean:
        # A's unacknowledged messages die with its session: not handed to B, not given back to A
        assert not lost_or_kept & set(r["b_after_kill"])
        assert not lost_or_kept & set(r["a_on_return"])
        # with A gone, everything new goes to B
        assert later <= set(r["b_after_kill"])
    else:
        # a persistent member's unacknowledged messages wait for *it*: B never gets them, A does on return
        assert not lost_or_kept & set(r["b_after_kill"])
        assert lost_or_kept <= set(r["a_on_return"])
        # and while it is away, Mosquitto 2.0 keeps dealing it a share of the new messages
        kept_for_a = later - set(r["b_after_kill"])
        assert kept_for_a and kept_for_a <= set(r["a_on_return"])
