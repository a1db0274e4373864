"""The MQTT device agent (`koala-device run --config FILE`). Imports nothing heavy on import."""
