"""Where a command finds the running agent's endpoint: --socket, --url, or the device config's."""

from __future__ import annotations

import argparse

from device_firmware_py.cli import CommandError


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("agent endpoint (one of)")
    g.add_argument("--config", help="the device config the agent runs with: its serve_socket / serve_port are used")
    g.add_argument("--socket", help="the agent's Unix socket (default with --config: <state_dir>/agent.sock)")
    g.add_argument("--url", help="the agent's loopback HTTP endpoint, e.g. http://127.0.0.1:8765")


def client_from_args(args: argparse.Namespace):  # -> DeviceClient
    from device_firmware_py.serving.client import DeviceClient

    if args.socket:
        return DeviceClient(args.socket)
    if args.url:
        return DeviceClient(url=args.url)
    if not args.config:
        raise CommandError("say where the agent listens: --config FILE (its device config), --socket PATH or --url URL")
    from device_firmware_py.config import ConfigError, DeviceConfig

    try:
        cfg = DeviceConfig.load(args.config)
    except ConfigError as exc:
        raise CommandError(f"config error: {exc}") from None
    if cfg.socket_path:
        return DeviceClient(cfg.socket_path)
    if cfg.serve and cfg.serve_port:
        return DeviceClient(url=f"http://127.0.0.1:{cfg.serve_port}")
    raise CommandError(f"{args.config}: the agent serves no endpoint (serve = false, or serve_socket = off and no "
                       "serve_port)\n  set serve = true in the device config and restart the agent")  # fmt: skip
