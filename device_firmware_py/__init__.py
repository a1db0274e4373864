"""KOALA Edge device firmware: MQTT agent, LiteRT small-model runtime, and the wire contract.

Dependency rule (checked by tests): nothing here imports torch, tensorflow or server_app; a device
runs with numpy, paho-mqtt and ai-edge-litert (+ ai-edge-quantizer for int8 re-quantization).
"""

__version__ = "0.1.0"
