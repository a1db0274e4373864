"""`koala-device run --config FILE`: run one device agent until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

HELP = "run the device agent: connect to the broker, take round assignments, train on device"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="device config file (.json or .toml); KOALA_DEVICE_* env overrides")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: the config's log_level)")


def run(args: argparse.Namespace) -> int:
    import logging
    import signal

    from device_firmware_py.agent.agent import DeviceAgent
    from device_firmware_py.config import ConfigError, DeviceConfig
    from device_firmware_py.logs import configure_logging

    try:
        cfg = DeviceConfig.load(args.config)
    except ConfigError as exc:
        print(f"koala-device: config error: {exc}")
        return 2
    configure_logging(args.log_level or cfg.log_level, cfg.log_format, static={"device": cfg.device_id})
    agent = DeviceAgent(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    try:
        agent.run()
    except ConfigError as exc:
        logging.getLogger("koala.agent").error("config error: %s", exc)
        return 2
    return 0
