"""Compatibility alias: the agent's early MQTT wrapper is now `device_firmware_py.mqtt.MqttClient`.

Kept so existing importers (bench/) keep working; new code imports `device_firmware_py.mqtt`.
"""

from __future__ import annotations

from device_firmware_py.mqtt import Handler, MqttClient, Will

MqttLink = MqttClient

__all__ = ["Handler", "MqttClient", "MqttLink", "Will"]
