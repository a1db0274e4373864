"""Server-side MQTT client: the device wrapper (device_firmware_py.mqtt) built from server Settings.

Why a re-export: the reconnect/QoS/LWT rules must be identical on both ends, so there is one
implementation; the server only adds construction from its pydantic Settings.
"""

from __future__ import annotations

from typing import Any

from device_firmware_py.mqtt import BrokerAddress, Handler, MqttClient, Will, parse_broker_url

__all__ = ["BrokerAddress", "Handler", "MqttClient", "Will", "client_from_settings", "parse_broker_url"]


def client_from_settings(broker: Any, client_id: str | None = None, *, will: Will | None = None, **kwargs: Any) -> MqttClient:
    """MqttClient from `Settings.broker` (url, username/password SecretStr, tls files, protocol, keepalive)."""
    password = broker.password.get_secret_value() if broker.password is not None else None
    return MqttClient.from_url(
        broker.url,
        client_id or broker.client_id,
        username=broker.username,
        password=password,
        ca_file=broker.tls_ca,
        cert_file=broker.tls_cert,
        key_file=broker.tls_key,
        keepalive=broker.keepalive,
        protocol=broker.protocol,
        will=will,
        **kwargs,
    )
