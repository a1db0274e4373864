"""`koala models ls|show|export|small`: get the trained models out, in formats usable without KOALA.

Two sources, the same output:
- over the REST API of a running server (default; `--api`, `--token-file` as `koala rounds`);
- from a server's data directory (`--data-dir`, its `paths.artifacts_dir`, e.g. ./koala_artifacts),
  with no server running: what an operator on the box or a backup restore has.

What comes out (docs/models.md): the large model as `model.safetensors` + `model.json` (the model
card), `model.pt` (`torch.load(..., weights_only=True)`), `model.torchscript.pt`, `model.onnx`; the
global small model of each architecture as float and int8 LiteRT `.tflite`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from server_app.commands.admin_client import add_api_options, api_base, emit, request

HELP = "list the large-model versions, show a model card, export the large model (safetensors, TorchScript, ONNX) " \
       "or the global small models (float/int8 .tflite), over the API or from a server's data directory"  # fmt: skip
LARGE = ("safetensors", "pt", "torchscript", "onnx")
SMALL = ("float", "int8")
LARGE_ARCH = "large"


def configure(p: argparse.ArgumentParser) -> None:
    p.epilog = ("examples:\n"
                "  koala models ls                                   # versions on the server (API)\n"
                "  koala models show latest                          # the newest model card\n"
                "  koala models export latest --format onnx --out m/ # model.safetensors + model.json + model.onnx\n"
                "  koala models small --format int8 --out m/         # every architecture's int8 .tflite\n"
                "  koala models export 3 --data-dir ./koala_artifacts --format all   # no server needed\n"
                "see docs/models.md for loading each format")  # fmt: skip
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("ls", help="large-model versions: round, accuracy, exported formats")
    show = sub.add_parser("show", help="a version's model card (builder, input, classes, accuracy per round, ...)")
    show.add_argument("version", nargs="?", default="latest", help="version number or 'latest' (default)")
    ex = sub.add_parser("export", help="write the large model of a version into --out, in the --format(s) asked",
                        description="Write model.safetensors + model.json (the model card) and the formats asked for "
                        "into --out. With --data-dir, a version the server did not export (an older server) is "
                        "exported from its checkpoint; that needs the server's settings (--config) for the "
                        "input shape, the policy and the data files.")  # fmt: skip
    ex.add_argument("version", nargs="?", default="latest", help="version number or 'latest' (default)")
    ex.add_argument("--format", nargs="+", default=["safetensors"], choices=[*LARGE, "all"],
                    help="safetensors (always written, with model.json), pt (state dict for torch.load "
                    "weights_only=True), torchscript, onnx, or all (default: safetensors)")  # fmt: skip
    ex.add_argument("--out", help="directory to write into (default ./koala-model-vN)")
    ex.add_argument("--config", help="with --data-dir: the server's settings file, to export a version that has "
                    "only a checkpoint (default: KOALA_CONFIG / KOALA_* env, as `koala serve`)")  # fmt: skip
    sm = sub.add_parser("small", help="write the global small model of each architecture as LiteRT .tflite into --out")
    sm.add_argument("arch", nargs="*", help="architectures (default: every one the version has)")
    sm.add_argument("--version", default="latest", help="large-model version the small models belong to (default latest)")
    sm.add_argument("--format", nargs="+", default=["float", "int8"], choices=[*SMALL, "all"],
                    help="float (float32 inference model) and/or int8 (full-int8, calibrated on the proxy set); "
                    "default both")  # fmt: skip
    sm.add_argument("--out", help="directory to write into (default ./koala-small-vN)")
    for sp in (ls, show, ex, sm):
        add_api_options(sp)
        sp.add_argument("--data-dir", help="read a server's data directory (paths.artifacts_dir, holding models/) "
                        "instead of asking the API")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    src: _Source = _Local(args) if args.data_dir else _Api(args)
    if args.action == "ls":
        rows = src.versions()
        emit(args, rows, ["version", "round", "large_test_acc", "formats", "small"], [_ls_row(r) for r in rows])
    elif args.action == "show":
        card = src.card(src.version(args.version))
        if args.json:
            print(json.dumps(card, indent=1))
        else:
            print(_summary(card))
    elif args.action == "export":
        v = src.version(args.version)
        fmts = list(LARGE) if "all" in args.format else sorted(set(args.format) | {"safetensors"}, key=LARGE.index)
        out = Path(args.out or f"koala-model-v{v}")
        written = src.export(v, fmts, out)
        _report(args, v, written)
    else:
        v = src.version(args.version)
        fmts = list(SMALL) if "all" in args.format else [f for f in SMALL if f in args.format]
        out = Path(args.out or f"koala-small-v{v}")
        written = src.small(v, args.arch, fmts, out)
        _report(args, v, written)
    return 0


def _ls_row(r: dict[str, Any]) -> dict[str, Any]:
    m = r.get("metrics") or {}
    return {**r, "round": r.get("round", r.get("round_id")), "large_test_acc": m.get("large_test_acc"),
            "formats": ",".join(r.get("formats") or []) or "-", "small": ",".join(r.get("small") or []) or "-"}  # fmt: skip


def _summary(card: dict[str, Any]) -> str:
    m, i, o = card["model"], card["input"], card["output"]
    acc = ", ".join(f"r{h.get('round')}:{h['large_test_acc']:.4f}" for h in card.get("accuracy_per_round", [])
                    if isinstance(h.get("large_test_acc"), float))  # fmt: skip
    lines = [
        f"version      {card['version']} (round {card.get('round')}, {card.get('created')})",
        f"builder      {m['factory']}  options {json.dumps(m.get('options', {}))}  seed {m.get('seed')}",
        f"class        {m['class']}  {m['param_count']:,} parameters",
        f"input        {i['name']} [N, {', '.join(map(str, i['shape']))}] {i['layout']} {i['dtype']}; "
        f"{i['normalisation'].get('formula')}",
        f"output       {o['name']} [N, {len(o['classes'])}] logits; classes {', '.join(o['classes'])}",
        f"data         {json.dumps(card.get('data', {}))}",
        f"policy       strategy {card.get('policy', {}).get('strategy')}  archs {card.get('policy', {}).get('archs')}",
        f"accuracy     {acc or '-'}",
        f"files        {', '.join(card.get('files', {}))}",
        f"small models {', '.join(card.get('small', {})) or '-'}",
    ]  # fmt: skip
    return "\n".join(lines)


def _report(args: argparse.Namespace, version: int, written: list[Path]) -> None:
    if args.json:
        print(json.dumps({"version": version, "files": [str(p) for p in written]}))
        return
    for p in written:
        print(f"{p}  {p.stat().st_size:,} bytes")


# ------------------------------------------------------------------------------------------- sources
class _Source:
    def versions(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def version(self, v: str) -> int:
        raise NotImplementedError

    def card(self, version: int) -> dict[str, Any]:
        raise NotImplementedError

    def export(self, version: int, fmts: list[str], out: Path) -> list[Path]:
        raise NotImplementedError

    def small(self, version: int, archs: list[str], fmts: list[str], out: Path) -> list[Path]:
        raise NotImplementedError


class _Local(_Source):
    """A server's data directory (server_app.models.export does the work)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from device_firmware_py.cli import CommandError
        from server_app.models import export as mx

        self.args, self.mx = args, mx
        try:
            self.models_dir = mx.resolve_models_dir(args.data_dir)
        except mx.ExportError as exc:
            raise CommandError(str(exc)) from None

    def _guard(self, fn: Any, *a: Any) -> Any:
        from device_firmware_py.cli import CommandError
        from server_app.models.card import CardError

        try:
            return fn(*a)
        except (self.mx.ExportError, CardError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from None

    def versions(self) -> list[dict[str, Any]]:
        return self.mx.list_versions(self.models_dir)

    def version(self, v: str) -> int:
        return self._guard(self.mx.pick_version, self.models_dir, v)

    def _edir(self, version: int, build: bool = False) -> Path:
        from device_firmware_py.cli import CommandError

        edir = self.mx.export_dir(self.models_dir, version)
        if (edir / self.mx.CARD_NAME).is_file():
            return edir
        if not build:
            raise CommandError(f"version {version} has no portable export in {self.models_dir} (an older server); "
                               f"`koala models export {version} --data-dir {self.args.data_dir}` builds it")  # fmt: skip
        ckpt = self.models_dir / f"strategy_v{version:05d}.pt"
        return self._guard(_export_checkpoint, self.mx, self.models_dir, version, ckpt, getattr(self.args, "config", None))

    def card(self, version: int) -> dict[str, Any]:
        return self._guard(self.mx.read_card, self._edir(version))

    def export(self, version: int, fmts: list[str], out: Path) -> list[Path]:
        edir = self._edir(version, build=True)
        files = [self._guard(self.mx.ensure_format, edir, f) for f in [*fmts, "card"]]
        return [_copy(p, out / p.name) for p in files]

    def small(self, version: int, archs: list[str], fmts: list[str], out: Path) -> list[Path]:
        edir = self._edir(version)
        have = [r["arch"] for r in self._guard(self.mx.small_models, edir)]
        written = []
        for arch in _pick_archs(archs, have, version):
            for f in fmts:
                p = self._guard(self.mx.ensure_small, edir, arch, f)
                written.append(_copy(p, out / p.name))
        return written


def _export_checkpoint(mx: Any, models_dir: Path, version: int, ckpt: Path, config: str | None) -> Path:
    """Export a version that only has its training checkpoint, with the server's settings for the
    context (input shape, policy, data digests). The checkpoint is the server's own file, a torch
    pickle: loading it runs code, so only a checkpoint from this data directory is read."""
    import numpy as np
    import torch

    from device_firmware_py.cli import CommandError
    from device_firmware_py.config import file_sha256
    from server_app.config import ConfigError, load_settings
    from server_app.models.card import ExportContext, read_dataset_info

    if not ckpt.is_file():
        raise CommandError(f"version {version}: neither an export nor a checkpoint ({ckpt}) in {models_dir}")
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    paths = settings.paths
    for what, p in (("proxy set", paths.proxy), ("test set", paths.test)):
        if not Path(p).is_file():
            raise CommandError(f"version {version} has no export yet, and exporting its checkpoint needs the {what} "
                               f"the server used ({p} not found): pass the server's settings with --config")  # fmt: skip
    with np.load(paths.proxy, allow_pickle=False) as z:
        proxy_x = np.asarray(z["x"], np.float32)
    with np.load(paths.test, allow_pickle=False) as z:
        y_test = np.asarray(z["y"], np.int64)
    shape = tuple(int(s) for s in proxy_x.shape[1:])
    num_classes = int(max(int(y_test.max()) + 1, 10))  # as server_app.services does
    data = {"proxy_sha256": file_sha256(paths.proxy), "proxy_size": len(proxy_x), "test_sha256": file_sha256(paths.test),
            "test_size": len(y_test)}  # fmt: skip
    ctx = ExportContext.from_policy(settings.policy, shape, num_classes, dataset=read_dataset_info(paths.proxy).get("dataset"),
                                    data=data, calibration_x=proxy_x[: mx.CALIBRATION_ROWS], proxy_x=proxy_x)  # fmt: skip
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return mx.write_export(models_dir, version, state, ctx, round_id=None, metrics={})


class _Api(_Source):
    """A running server's REST API (the downloads are checked against X-Content-SHA256)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def versions(self) -> list[dict[str, Any]]:
        page = request(self.args, "GET", "/models?kind=large&limit=1000")
        out = []
        for m in reversed(page["items"]):
            out.append({"version": m["version"], "round": m.get("round_id"), "metrics": m.get("metrics") or {},
                        "formats": [f for f in m.get("formats", {}) if f in LARGE] or None, "created": m.get("created")})  # fmt: skip
        return out

    def version(self, v: str) -> int:
        from device_firmware_py.cli import CommandError

        rows = self.versions()
        if not rows:
            raise CommandError("the server has no large-model version yet (no round has run)")
        if v in (None, "latest"):
            return int(max(r["version"] for r in rows))
        if not str(v).isdigit() or int(v) not in {r["version"] for r in rows}:
            raise CommandError(f"unknown model version {v!r}; the server has: {', '.join(str(r['version']) for r in rows)}")
        return int(v)

    def card(self, version: int) -> dict[str, Any]:
        return request(self.args, "GET", f"/models/large/{LARGE_ARCH}/{version}/card")

    def export(self, version: int, fmts: list[str], out: Path) -> list[Path]:
        base = f"/models/large/{LARGE_ARCH}/{version}/download?format="
        names = {"safetensors": "model.safetensors", "pt": "model.pt", "torchscript": "model.torchscript.pt",
                 "onnx": "model.onnx", "card": "model.json"}  # fmt: skip
        return [_download(self.args, base + f, out / names[f]) for f in [*fmts, "card"]]

    def small(self, version: int, archs: list[str], fmts: list[str], out: Path) -> list[Path]:
        have = [r["arch"] for r in request(self.args, "GET", f"/models/small?version={version}")]
        return [_download(self.args, f"/models/small/{a}?format={f}&version={version}", out / f"{a}.{f}.tflite")
                for a in _pick_archs(archs, have, version) for f in fmts]  # fmt: skip


def _pick_archs(asked: list[str], have: list[str], version: int) -> list[str]:
    from device_firmware_py.cli import CommandError

    if not have:
        raise CommandError(f"version {version} has no global small model (strategy without one, e.g. fedavg_large)")
    unknown = [a for a in asked if a not in have]
    if unknown:
        raise CommandError(f"version {version} has no small model {', '.join(unknown)}; it has: {', '.join(have)}")
    return asked or have


def _copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def _download(args: argparse.Namespace, path: str, dest: Path) -> Path:
    """GET one file of the API into `dest`; its sha256 must match the server's X-Content-SHA256."""
    import httpx

    from device_firmware_py.cli import CommandError
    from server_app.commands.admin_client import _token

    base = api_base(args)
    token = _token(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(f"{base}/api/v1{path}", headers=headers, timeout=300)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach the KOALA API at {base}: {exc}\n  start `koala serve`, or pass --api URL (a demo's: --run-dir DIR)") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail") or r.json().get("title")
        except ValueError:
            detail = r.text[:200]
        hint = " (the API wants a bearer token: --token-file or KOALA_API_TOKEN)" if r.status_code in (401, 403) else ""
        raise CommandError(f"GET {path}: {r.status_code} {detail}{hint}")
    want = r.headers.get("x-content-sha256")
    got = hashlib.sha256(r.content).hexdigest()
    if want and want != got:
        raise CommandError(f"GET {path}: the file's sha256 {got[:12]} is not the server's {want[:12]} (corrupted download?)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(r.content)
    return dest
