"""MkDocs hooks: the reference pages are rendered from the two machine-readable contracts at build
time, so the site can never disagree with the code.

* `reference/rest-api.md` from the FastAPI app's OpenAPI document (`create_app().openapi()`), and
  that document itself as `reference/openapi.json`;
* the result plots the pages show, copied into `docs/img/`;
* `reference/mqtt-contract.md` from `device_firmware_py/contract/asyncapi.yaml` (channels,
  operations, messages and their payload schemas), and the YAML itself.

Both are written into `docs/reference/` before MkDocs collects the files (`on_pre_build`); the
directory is generated (gitignored), never edited by hand. Offline: nothing is fetched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "reference"
ASYNCAPI = ROOT / "device_firmware_py" / "contract" / "asyncapi.yaml"


def on_pre_build(config: Any) -> None:  # noqa: ARG001 - the MkDocs hook signature
    OUT.mkdir(parents=True, exist_ok=True)
    spec = _openapi()
    (OUT / "openapi.json").write_text(json.dumps(spec, indent=1) + "\n")
    (OUT / "rest-api.md").write_text(render_openapi(spec))
    import yaml

    doc = yaml.safe_load(ASYNCAPI.read_text())
    (OUT / "asyncapi.yaml").write_text(ASYNCAPI.read_text())
    (OUT / "mqtt-contract.md").write_text(render_asyncapi(doc))
    copy_plots()


def copy_plots() -> None:
    """The result plots the pages show live with their result files (bench/results, research/results):
    copied into docs/img/ (generated, gitignored) so the site carries them."""
    import shutil

    img = ROOT / "docs" / "img"
    img.mkdir(exist_ok=True)
    wanted = set()
    for page in (ROOT / "docs").glob("*.md"):
        wanted |= {m.split("/")[-1] for m in re.findall(r"\]\(img/([^)]+\.png)\)", page.read_text())}
    for name in wanted:
        for src in (ROOT / "bench" / "results" / name, ROOT / "research" / "results" / name):
            if src.is_file():
                shutil.copy2(src, img / name)
                break


def _openapi() -> dict[str, Any]:
    from server_app.api.app import create_app

    return create_app().openapi()


def _cell(text: object) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _schema_type(s: dict[str, Any], refs: dict[str, Any] | None = None) -> str:
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})" if refs is not None else name
    for key in ("anyOf", "oneOf"):
        if key in s:
            return " or ".join(_schema_type(x, refs) for x in s[key])
    t = s.get("type", "object" if "properties" in s else "any")
    if t == "array":
        return f"array of {_schema_type(s.get('items', {}), refs)}"
    if "enum" in s:
        return f"{t}: " + ", ".join(f"`{v}`" for v in s["enum"])
    return str(t)


def render_openapi(spec: dict[str, Any]) -> str:
    info = spec.get("info", {})
    lines = [f"# REST API reference ({info.get('title', '')} {info.get('version', '')})", "",
             "Generated from the server's OpenAPI document at build time "
             "([openapi.json](openapi.json); a running server serves it at `/openapi.json`, with "
             "Swagger UI at `/docs`). Routes marked with a lock need `Authorization: Bearer <token>`.", ""]  # fmt: skip
    schemes = spec.get("components", {}).get("securitySchemes", {})
    if schemes:
        lines += ["Security schemes: " + ", ".join(f"`{k}` ({v.get('type')} {v.get('scheme', '')})".strip() for k, v in schemes.items()), ""]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "patch", "delete"):
                by_tag.setdefault((op.get("tags") or ["other"])[0], []).append((method.upper(), path, op))
    for tag in sorted(by_tag):
        lines += [f"## {tag}", ""]
        for method, path, op in by_tag[tag]:
            lock = " 🔒" if op.get("security") else ""
            lines += [f"### `{method} {path}`{lock}", "", _cell(op.get("summary", "")), ""]
            if op.get("description"):
                lines += [op["description"].strip(), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
                for p in params:
                    lines.append(f"| `{p['name']}` | {p.get('in')} | {_cell(_schema_type(p.get('schema', {})))} | "
                                 f"{'yes' if p.get('required') else 'no'} | {_cell(p.get('description', ''))} |")  # fmt: skip
                lines.append("")
            body = op.get("requestBody", {}).get("content", {})
            if body:
                lines += ["Request body: " + ", ".join(f"`{ct}`" + (f" ({_schema_type(c.get('schema', {}))})" if c.get("schema") else "")
                                                     for ct, c in body.items()), ""]  # fmt: skip
            codes = op.get("responses", {})
            if codes:
                lines += ["Responses: " + ", ".join(f"`{c}` {_cell(r.get('description', ''))}" for c, r in codes.items()), ""]
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        lines += ["## Schemas", ""]
        for name, s in sorted(schemas.items()):
            lines += [f"### {name}", "", _cell(s.get("description", "")), ""]
            props = s.get("properties", {})
            if props:
                req = set(s.get("required", []))
                lines += ["| field | type | required | description |", "|---|---|---|---|"]
                for f, fs in props.items():
                    lines.append(f"| `{f}` | {_cell(_schema_type(fs))} | {'yes' if f in req else 'no'} | {_cell(fs.get('description', fs.get('title', '')))} |")
                lines.append("")
    return "\n".join(lines) + "\n"


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    if isinstance(node, dict) and "$ref" in node:
        cur: Any = doc
        for part in node["$ref"].lstrip("#/").split("/"):
            cur = cur[part]
        return cur
    return node


def render_asyncapi(doc: dict[str, Any]) -> str:
    info = doc.get("info", {})
    lines = [f"# MQTT contract reference ({info.get('title', '')} {info.get('version', '')})", "",
             "Generated at build time from [`asyncapi.yaml`](asyncapi.yaml) (AsyncAPI "
             f"{doc.get('asyncapi', '')}), the contract's one document; tests hold it to the code "
             "(`tests/device_firmware_py/test_contract_asyncapi.py`, `test_contract_agent_messages.py`).", ""]  # fmt: skip
    if info.get("description"):
        lines += [info["description"].strip(), ""]
    lines += ["## Channels", "", "| channel | address | messages | description |", "|---|---|---|---|"]
    for name, ch in doc.get("channels", {}).items():
        msgs = ", ".join(f"[{k}](#{k.lower()})" for k in (ch.get("messages") or {}))
        lines.append(f"| `{name}` | `{ch.get('address', '')}` | {msgs} | {_cell(ch.get('description', ch.get('summary', '')))} |")
    lines.append("")
    ops = doc.get("operations", {})
    if ops:
        lines += ["## Operations", "", "| operation | action | channel | summary |", "|---|---|---|---|"]
        for name, op in ops.items():
            ch = op.get("channel", {}).get("$ref", "").rsplit("/", 1)[-1]
            lines.append(f"| `{name}` | {op.get('action', '')} | `{ch}` | {_cell(op.get('summary', op.get('description', '')))} |")
        lines.append("")
    messages = doc.get("components", {}).get("messages", {})
    if messages:
        lines += ["## Messages", ""]
        for name, m in messages.items():
            m = _resolve(doc, m)
            lines += [f"### {name}", "", _cell(m.get("summary", "")), ""]
            if m.get("description"):
                lines += [m["description"].strip(), ""]
            if m.get("contentType"):
                lines += [f"Content type: `{m['contentType']}`", ""]
            payload = _resolve(doc, m.get("payload", {}))
            props = payload.get("properties", {}) if isinstance(payload, dict) else {}
            if props:
                req = set(payload.get("required", []))
                lines += ["| field | type | required | description |", "|---|---|---|---|"]
                for f, fs in props.items():
                    fs = _resolve(doc, fs)
                    lines.append(f"| `{f}` | {_cell(_schema_type(fs))} | {'yes' if f in req else 'no'} | {_cell(fs.get('description', ''))} |")
                lines.append("")
    return "\n".join(lines) + "\n"
