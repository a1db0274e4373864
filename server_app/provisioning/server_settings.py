"""The server's settings file for a provisioned fleet: `koala serve --config WORKSPACE/server.toml`.

Why generate it: after `koala provision fleet`, everything the server needs to join that fleet is
already decided by the manifest and the files just written (which listener it dials, its service
account, where the broker files live for live revocation, the registry URL, where the data is).
Writing it down here saves the operator from copying five values into env vars by hand, and
keeps the secrets out of it: the file names the broker password file and the API token file
(`api.token`, made here once), never the secrets themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

from server_app.provisioning.accounts import secret_path
from server_app.provisioning.manifest import FleetManifest
from server_app.provisioning.passwords import new_secret, write_secret_file

SERVER_ACCOUNT = "koala-server"


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def ensure_api_token(workspace: Path) -> Path:
    """WORKSPACE/api.token (0600): the REST API's bearer token, made once and kept on re-runs."""
    path = workspace / "api.token"
    if not path.exists():
        write_secret_file(path, new_secret())
    return path


def render_server_settings(m: FleetManifest, workspace: Path, db_url: str) -> str:
    """TOML for `koala serve --config` (server_app.config.Settings sections); paths absolute."""
    ws = workspace.resolve()
    broker_dir = ws / m.broker.dir
    if m.broker.plain_port:
        url, ca = f"mqtt://127.0.0.1:{m.broker.plain_port}", None  # the loopback listener
    else:
        url, ca = f"mqtts://127.0.0.1:{m.broker.tls_port}", broker_dir / "certs" / "ca.crt"
    lines = [
        f"# Written by `koala provision fleet` for fleet {m.name!r}; rewritten on every run.",
        "# Start the server with: koala serve --config THIS_FILE (KOALA_* env vars override it;",
        "# add a [policy] section or --policy FILE for the training policy).",
        "",
        "[database]",
        f"url = {_toml_str(db_url)}",
        "",
        "[broker]",
        f"url = {_toml_str(url)}",
        f"username = {_toml_str(SERVER_ACCOUNT)}",
        f"password_file = {_toml_str(secret_path(broker_dir, SERVER_ACCOUNT))}",
        'shared_group = "koala"',
        f"provision_dir = {_toml_str(broker_dir)}  # REST revocation removes the broker account live",
    ]
    if ca is not None:
        lines.append(f"tls_ca = {_toml_str(ca)}")
    lines += [
        "",
        "[api]",
        f"bearer_token_file = {_toml_str(ws / 'api.token')}  # koala rounds|devices --token-file this",
        "",
        "[paths]",
        f"data_dir = {_toml_str(ws / m.server.data_dir)}  # proxy.npz + test.npz from `koala data prepare`",
    ]
    return "\n".join(lines) + "\n"


def write_server_settings(m: FleetManifest, workspace: Path, db_url: str) -> Path:
    ensure_api_token(workspace)
    path = workspace / "server.toml"
    path.write_text(render_server_settings(m, workspace, db_url))
    return path
