"""Generators agree with Mosquitto's own tools and with the numbers the configs claim."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from cryptography import x509

from server_app.provisioning import tls
from server_app.provisioning.broker_conf import BrokerConf, MiB, render, required_packet_size
from server_app.provisioning.local_broker import find_mosquitto, free_port, wait_listening
from server_app.provisioning.passwords import mosquitto_hash, render_password_file, verify


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_our_hash_format_matches_mosquitto_passwd(tmp_path) -> None:
    pw = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "alice", "s3cret"], check=True)
    theirs = pw.read_text().strip().split(":", 1)[1]
    assert verify("s3cret", theirs) and not verify("wrong", theirs)
    _, _, iters, salt, _ = theirs.split("$")
    import base64

    assert mosquitto_hash("s3cret", iterations=int(iters), salt=base64.b64decode(salt)) == theirs


def test_password_file_refuses_injection() -> None:
    with pytest.raises(ValueError):
        render_password_file([("evil:user", mosquitto_hash("x"))])
    with pytest.raises(ValueError):
        render_password_file([("bob", "plaintext")])


def test_max_packet_size_covers_the_largest_assignment() -> None:
    # FedAvg-small assignment: 5000x10 float16 teacher logits + 60k float32 weights + header
    biggest = 5000 * 10 * 2 + 60_000 * 4 + 16 * 1024
    size = required_packet_size()
    assert size == 1 * MiB and size >= 2.5 * biggest
    # FedAvg of the ~734k-param large model (simulation only) is deliberately NOT admitted
    assert size < 734_000 * 4


def test_rendered_prod_config_has_every_hardening_line(tmp_path) -> None:
    text = render(BrokerConf(tmp_path, tmp_path / "data", server_port=None))
    for line in (
        "allow_anonymous false",
        f"plugin_opt_config_file {tmp_path}/dynamic-security.json",
        "persistence true",
        f"max_packet_size {MiB}",
        "require_certificate false",
        "listener 8883 0.0.0.0",
    ):
        assert line in text
    assert "${" not in text and "\nlistener 1883" not in text
    assert "\npassword_file" not in text and "\nacl_file" not in text  # acl_file never checks SUBSCRIBE


def test_server_certificate_names_loopback_and_extra_hosts() -> None:
    ca = tls.make_ca()
    cert = x509.load_pem_x509_certificate(tls.make_server_cert(ca, ["broker.lan", "10.0.0.2"]).cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n.value) for n in san}
    assert {"localhost", "127.0.0.1", "broker.lan", "10.0.0.2"} <= names


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
def test_dev_config_starts_on_loopback(tmp_path) -> None:
    from pathlib import Path

    port = free_port()
    src = Path(__file__).resolve().parents[2] / "broker_config" / "mosquitto.dev.conf"
    conf = tmp_path / "dev.conf"
    conf.write_text(src.read_text().replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"))
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_listening(port, proc=proc)
    finally:
        proc.terminate()
        proc.wait(10)


def test_queue_limits_hold_a_whole_round_of_results(tmp_path) -> None:
    """The server's results subscription must queue a whole round: Mosquitto drops QoS 1 messages
    past max_queued_messages/bytes, after the device already has its PUBACK (a lost result)."""
    from server_app.provisioning.broker_conf import queue_limits, result_frame_bytes

    frame = result_frame_bytes()
    assert frame == 5000 * 10 * 2 + 60_000 * 4 + 16 * 1024
    messages, nbytes = queue_limits(1500)
    assert messages >= 1500 and nbytes >= 1500 * frame
    text = render(BrokerConf(tmp_path, tmp_path / "data", max_connections=1024))
    q = {k: int(v) for k, v in (ln.split() for ln in text.splitlines() if ln.startswith("max_queued_"))}
    assert q["max_queued_messages"] >= 1024 and q["max_queued_bytes"] >= 1024 * frame
    assert "max_inflight_messages 100" in text
    big = render(BrokerConf(tmp_path, tmp_path / "data", fleet_size=5000))
    assert f"max_queued_messages {2 * 5000}" in big
