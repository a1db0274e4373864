"""Test helper: a thread-safe MQTT handler that collects (topic, payload) with a blocking wait."""

from __future__ import annotations

import threading


class Inbox:
    """Use as an `MqttClient` handler; `wait_for(n)` blocks until n messages or the timeout."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.items.append((topic, payload))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.items) >= n, timeout)
            return list(self.items)
