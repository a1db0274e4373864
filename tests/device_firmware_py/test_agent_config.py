"""DeviceConfig: JSON/TOML file + KOALA_DEVICE_* env, validated; the device needs no pydantic."""

from __future__ import annotations

import json

import pytest

from device_firmware_py.config import ConfigError, DeviceConfig, file_sha256


def test_file_then_env_precedence(tmp_path):
    p = tmp_path / "dev.toml"
    p.write_text('[device]\ndevice_id = "dev7"\ndata_path = "a.npz"\nproxy_path = "p.npz"\nstate_dir = "s"\n'
                 'broker_url = "mqtt://127.0.0.1:1999"\nnum_threads = 2\n')  # fmt: skip
    cfg = DeviceConfig.load(p, env={"KOALA_DEVICE_NUM_THREADS": "1", "KOALA_DEVICE_QUANTIZE": "false",
                                    "KOALA_DEVICE_BROKER_URL": "mqtts://10.0.0.2"})  # fmt: skip
    assert (cfg.device_id, cfg.num_threads, cfg.quantize) == ("dev7", 1, False)
    assert (cfg.host, cfg.port, cfg.tls, cfg.mqtt_client_id) == ("10.0.0.2", 8883, True, "koala-dev-dev7")


@pytest.mark.parametrize(
    "patch, message",
    [({"device_id": "bad/id"}, "device id"), ({"broker_url": "http://x"}, "broker_url"), ({"nope": 1}, "unknown"),
     ({"num_threads": 0}, "num_threads")],
)  # fmt: skip
def test_invalid_configs_fail_loudly(tmp_path, patch, message):
    base = {"device_id": "d1", "data_path": "a", "proxy_path": "p", "state_dir": "s"}
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**base, **patch}))
    with pytest.raises(ConfigError, match=message):
        DeviceConfig.load(p, env={})


def test_missing_keys_and_proxy_digest(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"device_id": "d1"}))
    with pytest.raises(ConfigError, match="missing"):
        DeviceConfig.load(p, env={})
    proxy = tmp_path / "proxy.npz"
    proxy.write_bytes(b"proxy")
    (tmp_path / "a.npz").write_bytes(b"x")
    cfg = DeviceConfig("d1", str(tmp_path / "a.npz"), str(proxy), str(tmp_path / "s"), proxy_sha256="0" * 64)
    with pytest.raises(ConfigError, match="sha256"):
        cfg.check_files()
    cfg.proxy_sha256 = file_sha256(proxy)
    cfg.check_files()
