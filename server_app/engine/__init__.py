"""The KOALA algorithm, independent of the transport (in-memory simulation or MQTT)."""

from server_app.engine.rounds import run_rounds
from server_app.engine.strategy import Strategy
from server_app.engine.types import Assignment, DeviceInfo, Result, RoundReport

__all__ = ["Assignment", "DeviceInfo", "Result", "RoundReport", "Strategy", "run_rounds"]
