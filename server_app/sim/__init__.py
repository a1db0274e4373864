"""`koala sim`: run KOALA and baselines in simulation (InMemoryFleet, real LiteRT devices)."""

from server_app.sim.config import MethodSpec, SimConfig, load_config
from server_app.sim.runner import run_experiment

__all__ = ["MethodSpec", "SimConfig", "load_config", "run_experiment"]
