"""MQTT transport: embedded brokers (broker.py), the client wrapper (mqtt_client.py), MqttFleet."""
