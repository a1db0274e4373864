"""Portable exports of the server's models: what a user downloads, instead of the training checkpoint.

Why: the checkpoint (`models/strategy_vNNNNN.pt`) is the strategy's resume state -- a torch pickle
(loadable only with `torch.load(weights_only=False)`, i.e. by trusting it to run code) that holds
a bare state dict, usable only by someone who finds the builder in this source and knows its
options. After every published model version the server writes, next to it,

    models/export/vNNNNN/
      model.safetensors        the large model's state dict (no pickle; safetensors.torch.load_file)
      model.json               the model card (server_app/models/card.py): builder + options, input
                               shape/layout/normalisation, class names, round, version, policy, data
                               digests, accuracy per round, the layer list for rebuilding without source
      small/{arch}.safetensors the global small model of each architecture (weights w000.., numpy)
      small/{arch}.float.tflite  its float LiteRT inference model (logits only)
    models/export/calibration.npy  proxy rows the int8 small models are calibrated on

and, in a background thread (or on the first request: `ensure_format`), the derived formats:

      model.pt                 the same state dict for `torch.load(..., weights_only=True)`
      model.torchscript.pt     TorchScript (torch.jit.load; no model source needed)
      model.onnx               ONNX (onnxruntime; no torch at all)
      small/{arch}.int8.tflite full-int8 LiteRT model (ai-edge-quantizer, as the devices make it)

Every file is written atomically (tmp + os.replace); the card is written last, so a directory
with a card is complete. Nothing here raises into the round loop: `ModelExporter.publish` logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from device_firmware_py.fileio import atomic_write
from server_app.models.card import CARD_NAME, CardError, ExportContext, build_card, read_card

log = logging.getLogger("koala.export")

EXPORT_DIR = "export"
CALIBRATION = "calibration.npy"
CALIBRATION_ROWS = 256
LARGE_FILES = {"safetensors": "model.safetensors", "pt": "model.pt", "torchscript": "model.torchscript.pt",
               "onnx": "model.onnx", "card": CARD_NAME}  # fmt: skip
LARGE_FORMATS = tuple(LARGE_FILES)
SMALL_FORMATS = ("float", "int8")
ONNX_OPSET = 17
_CHECKPOINT = re.compile(r"^strategy_v(\d+)\.pt$")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_build_lock = threading.Lock()  # one derived build at a time per process (torch.onnx.export has global state)


class ExportError(ValueError):
    """A model version, format or architecture that cannot be exported; the message says why."""


# ------------------------------------------------------------------------------------------ layout
def export_dir(models_dir: str | Path, version: int) -> Path:
    return Path(models_dir) / EXPORT_DIR / f"v{int(version):05d}"


def export_dir_of_checkpoint(checkpoint: str | Path) -> Path:
    """The export directory of a registered checkpoint `.../models/strategy_vNNNNN.pt`."""
    p = Path(checkpoint)
    m = _CHECKPOINT.match(p.name)
    if m is None:
        raise ExportError(f"{p.name} is not a strategy checkpoint (strategy_vNNNNN.pt)")
    return export_dir(p.parent, int(m.group(1)))


def resolve_models_dir(data_dir: str | Path) -> Path:
    """A server's data directory (`paths.artifacts_dir`, holding `models/`) or its `models/` itself."""
    d = Path(data_dir)
    if not d.is_dir():
        raise ExportError(f"data directory {d} does not exist (the server's paths.artifacts_dir, e.g. ./koala_artifacts)")
    for cand in (d / "models", d):
        if (cand / EXPORT_DIR).is_dir() or any(cand.glob("strategy_v*.pt")):
            return cand
    raise ExportError(f"{d} holds no models: neither {d / 'models'} nor {d} has strategy_v*.pt checkpoints or "
                      f"an {EXPORT_DIR}/ directory (is it the server's paths.artifacts_dir?)")  # fmt: skip


def list_versions(models_dir: str | Path) -> list[dict[str, Any]]:
    """Every version in a models directory (checkpoint and/or export), oldest first."""
    md = Path(models_dir)
    found: dict[int, dict[str, Any]] = {}
    for p in md.glob("strategy_v*.pt"):
        if (m := _CHECKPOINT.match(p.name)) is not None:
            found.setdefault(int(m.group(1)), {})["checkpoint"] = str(p)
    for p in (md / EXPORT_DIR).glob("v*"):
        if (m := _VERSION_DIR.match(p.name)) is not None and (p / CARD_NAME).is_file():
            found.setdefault(int(m.group(1)), {})["export"] = str(p)
    out = []
    for v in sorted(found):
        row: dict[str, Any] = {"version": v, "checkpoint": found[v].get("checkpoint"), "export": found[v].get("export")}
        if row["export"]:
            try:
                card = read_card(row["export"])
                row.update(round=card.get("round"), metrics=card.get("metrics", {}), small=sorted(card.get("small", {})),
                           formats=present_formats(row["export"]))  # fmt: skip
            except CardError as exc:
                row["error"] = str(exc)
        out.append(row)
    return out


def present_formats(edir: str | Path) -> list[str]:
    d = Path(edir)
    return [f for f, name in LARGE_FILES.items() if (d / name).is_file()]


def pick_version(models_dir: str | Path, version: int | str | None) -> int:
    """`None`/"latest" -> the newest version; else the number, which must exist."""
    rows = list_versions(models_dir)
    if not rows:
        raise ExportError(f"no model versions in {models_dir}")
    if version in (None, "latest"):
        return int(rows[-1]["version"])
    try:
        v = int(version)  # type: ignore[arg-type]
    except ValueError:
        raise ExportError(f"version {version!r} is not a number or 'latest'") from None
    if v not in {r["version"] for r in rows}:
        raise ExportError(f"unknown model version {v} in {models_dir}; known: {', '.join(str(r['version']) for r in rows)}")
    return v


# ------------------------------------------------------------------------------------------ building
def build_model(factory: str, options: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> Any:
    """The large model's module, built the way the server built it (weights still initial)."""
    import torch

    from server_app.plugins import load_ref

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = load_ref(factory, "large model factory")(tuple(int(s) for s in input_shape), int(num_classes),
                                                         seed=seed, **options)  # fmt: skip
    finally:
        torch.random.set_rng_state(gen_state)
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def load_large(edir: str | Path) -> Any:
    """The exported large model as a torch module (eval mode, CPU), from its card + safetensors:
    no pickle is loaded. Needs the factory's module importable (the built-in one, or the plug-in)."""
    from safetensors.torch import load_file

    card = read_card(edir)
    m, i = card["model"], card["input"]
    model = build_model(m["factory"], m.get("options", {}), tuple(i["shape"]), len(card["output"]["classes"]),
                        int(m.get("seed", 0)))  # fmt: skip
    model.load_state_dict(load_file(str(Path(edir) / LARGE_FILES["safetensors"])), strict=True)
    return model.eval()


def _sha(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _previous_history(models_dir: Path, version: int) -> list[dict[str, Any]]:
    """Accuracy entries of the newest earlier export (the card carries the whole history on)."""
    for row in reversed(list_versions(models_dir)):
        if row["version"] < version and row.get("export"):
            try:
                return list(read_card(row["export"]).get("accuracy_per_round", []))
            except CardError:
                continue
    return []


def _small_manifest(arch: str, input_shape: tuple[int, int, int]) -> Any:
    from device_firmware_py.runtime.manifest import artifact_path, load_manifest

    return load_manifest(artifact_path(arch, input_shape).with_suffix(".json"))


def _safetensors_blob(large: dict[str, Any], version: int) -> bytes:
    from safetensors.torch import save

    return save(large, metadata={"format": "pt", "koala_model_version": str(version)})


def _exported(edir: Path, state: dict[str, Any]) -> bool:
    """True when `edir` already holds this exact large model (equal tensors; not equal bytes: the
    safetensors header's metadata order is not stable): a data directory reused with a fresh
    registry must not keep serving an older run's version N."""
    import torch
    from safetensors.torch import load_file

    if state.get("large") is None or not (edir / CARD_NAME).is_file():
        return False
    try:
        have = load_file(str(edir / LARGE_FILES["safetensors"]))
    except (OSError, ValueError, RuntimeError):
        return False
    want = state["large"]
    return have.keys() == want.keys() and all(torch.equal(have[k], want[k].detach().cpu()) for k in have)


def write_export(
    models_dir: str | Path,
    version: int,
    state: dict[str, Any],
    ctx: ExportContext,
    *,
    round_id: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write the portable export of one version from a strategy state (`Strategy.state_dict()` or a
    loaded checkpoint: `large` = torch state dict, `small` = {arch: [numpy weights]}). Returns its dir."""
    from safetensors.numpy import save as save_np

    from device_firmware_py.runtime.quantize import patch_inference_model

    models_dir = Path(models_dir)
    out = export_dir(models_dir, version)
    if state.get("large") is None:
        raise ExportError(f"version {version}: the strategy has no large model to export")
    model = build_model(ctx.factory, ctx.options, ctx.input_shape, ctx.num_classes, ctx.seed)
    large = {k: v.detach().to("cpu").contiguous() for k, v in state["large"].items()}
    model.load_state_dict(large, strict=True)
    files: dict[str, dict[str, Any]] = {}
    blob = _safetensors_blob(large, version)
    atomic_write(out / LARGE_FILES["safetensors"], blob)
    files[LARGE_FILES["safetensors"]] = _sha(blob)

    small: dict[str, dict[str, Any]] = {}
    weights_of = {a: (ws, {"source": "global", "how": "the strategy's global small model (FedAvg of the devices' "
                           "weights)"}) for a, ws in (state.get("small") or {}).items()}  # fmt: skip
    weights_of.update(_server_students(models_dir, version, model, ctx, skip=set(weights_of)))
    for arch, (weights, source) in sorted(weights_of.items()):
        try:
            man = _small_manifest(arch, ctx.input_shape)
        except FileNotFoundError as exc:
            log.warning("small model %s not exported: %s", arch, exc)
            continue
        ws = [np.ascontiguousarray(np.asarray(w, np.float32)) for w in weights]
        st = save_np(dict(zip(man.weight_names, ws, strict=True)), metadata={"artifact": man.name, "arch": arch})
        flt = patch_inference_model(man.raw, man.inference_path.read_bytes(), ws)
        atomic_write(out / "small" / f"{arch}.safetensors", st)
        atomic_write(out / "small" / f"{arch}.float.tflite", flt)
        small[arch] = {**source, "artifact": man.name, "artifact_sha256": man.sha256, "input_shape": list(man.input_shape),
                       "input_layout": "NHWC", "num_classes": man.num_classes, "param_count": man.param_count,
                       "weights": man.weight_names,
                       "files": {f"small/{arch}.safetensors": _sha(st), f"small/{arch}.float.tflite": _sha(flt)}}  # fmt: skip

    cal = models_dir / EXPORT_DIR / CALIBRATION
    if ctx.calibration_x is not None and not cal.is_file():
        rows = np.ascontiguousarray(np.asarray(ctx.calibration_x, np.float32)[:CALIBRATION_ROWS])
        atomic_write(cal, lambda f: np.save(f, rows))
    data = dict(ctx.data)
    if cal.is_file():
        data["calibration_sha256"] = hashlib.sha256(cal.read_bytes()).hexdigest()
    ctx_card = ExportContext(**{**ctx.__dict__, "data": data})
    card = build_card(ctx_card, model, version=version, round_id=round_id, metrics=dict(metrics or {}),
                      history=_previous_history(models_dir, version), files=files, small=small)  # fmt: skip
    atomic_write(out / CARD_NAME, (json.dumps(card, indent=1, default=str) + "\n").encode())
    return out


def _server_students(
    models_dir: Path, version: int, model: Any, ctx: ExportContext, skip: set[str]
) -> dict[str, tuple[list[np.ndarray], dict[str, Any]]]:
    """Small models for the policy's architectures the strategy keeps no global model of.

    Why: with the default `teacher = device_logits` devices upload logits, not weights, so no global
    small model exists, yet a new device (or a user) wants the small model that follows the current
    large one. The server makes it as a device does its forward KD: the LiteRT training artifact,
    distilled from the large model's logits on the proxy set, `max(1, fkd_epochs)` passes per
    version, continuing from the previous version's student (same artifact) -- about a second per
    architecture for 1,000 proxy rows, so it runs with the synchronous part of the export."""
    if ctx.proxy_x is None:
        return {}
    from device_firmware_py.runtime.manifest import format_input
    from device_firmware_py.runtime.small_model import SmallModel
    from server_app.models.large import predict_logits

    pol = ctx.policy
    archs = [a for a in pol.get("archs", []) if a not in skip]
    if not archs:
        return {}
    proxy = np.asarray(ctx.proxy_x, np.float32)
    teacher = predict_logits(model, proxy)
    epochs, temp, lr = max(1, int(pol.get("fkd_epochs", 1))), float(pol.get("temperature", 1.0)), float(pol.get("fkd_lr", 1e-3))
    out: dict[str, tuple[list[np.ndarray], dict[str, Any]]] = {}
    for arch in archs:
        try:
            # builtin kernels: XNNPACK would print its one native INFO line to the server's stderr,
            # breaking `log_format = json`'s one-object-per-line (and speed does not matter here)
            sm = SmallModel(f"{arch}_{format_input(ctx.input_shape)}", num_threads=1, delegates=False)
        except (FileNotFoundError, ValueError) as exc:
            log.warning("small model %s not distilled: %s", arch, exc)
            continue
        start = _previous_student(models_dir, version, arch, sm.manifest.sha256)
        if start is not None:
            sm.set_weights(start[1])
        sm.distill(proxy, teacher, temperature=temp, epochs=epochs, lr=lr, seed=version)
        how = (f"the large model distilled into the {arch} artifact on the proxy set on the server ({epochs} pass(es) "
               f"per version at T={temp:g}, lr={lr:g}), continuing from "
               f"{'version ' + str(start[0]) if start else 'the artifact initialisation'}; devices upload logits, so "
               "no averaged small model exists")  # fmt: skip
        out[arch] = (sm.get_weights(), {"source": "server_kd", "how": how, "kd": {"epochs": epochs, "temperature": temp,
                     "lr": lr, "proxy_rows": len(proxy), "from_version": start[0] if start else None}})  # fmt: skip
    return out


def _previous_student(models_dir: Path, version: int, arch: str, artifact_sha: str) -> tuple[int, list[np.ndarray]] | None:
    """(version, weights) of the newest earlier server-distilled `arch` student of the same artifact."""
    from safetensors.numpy import load_file

    for row in reversed(list_versions(models_dir)):
        if row["version"] >= version or not row.get("export"):
            continue
        try:
            info = read_card(row["export"]).get("small", {}).get(arch)
            if not info or info.get("source") != "server_kd" or info.get("artifact_sha256") != artifact_sha:
                continue
            named = load_file(str(Path(row["export"]) / "small" / f"{arch}.safetensors"))
            return int(row["version"]), [named[n] for n in info["weights"]]
        except (CardError, OSError, KeyError, ValueError):
            continue
    return None


def ensure_format(edir: str | Path, fmt: str) -> Path:
    """The file of a large-model format in an export directory, built from the card + safetensors
    when it is not there yet (cached: the next call only stats it)."""
    edir = Path(edir)
    if fmt not in LARGE_FILES:
        raise ExportError(f"unknown format {fmt!r}; formats: {', '.join(LARGE_FORMATS)}")
    path = edir / LARGE_FILES[fmt]
    if path.is_file():
        return path
    read_card(edir)  # a clear error when this is no export
    with _build_lock:
        if path.is_file():
            return path
        model = load_large(edir)
        if fmt == "pt":
            _write_pt(model, path)
        elif fmt == "torchscript":
            _write_torchscript(model, read_card(edir), path)
        elif fmt == "onnx":
            _write_onnx(model, read_card(edir), path)
        else:  # safetensors / card are written by write_export
            raise ExportError(f"{path} is missing: the export of this version is incomplete; rebuild it")
    return path


def _example_input(card: dict[str, Any], n: int = 2) -> Any:
    import torch

    return torch.zeros((n, *card["input"]["shape"]), dtype=torch.float32)


def _write_pt(model: Any, path: Path) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write(path, buf.getvalue())


def _write_torchscript(model: Any, card: dict[str, Any], path: Path) -> None:
    """Traced with an NHWC batch: the module's layout test runs at trace time, so the saved graph
    takes NHWC input (the card's `input.layout`) at any batch size."""
    import io

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # the trace-time layout test; and torch 2.13 marks TorchScript deprecated (still supported,
        # and still the one torch format that loads without the model's Python source)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, _example_input(card), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    atomic_write(path, buf.getvalue())


def _write_onnx(model: Any, card: dict[str, Any], path: Path) -> None:
    """The TorchScript-based exporter (dynamo=False): the torch.export one needs onnxscript, which
    the server does not otherwise install, and gives nothing more for a plain CNN. Dynamic batch."""
    import io

    import onnx
    import torch

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation + the trace-time layout test
        torch.onnx.export(model, (_example_input(card),),
                          buf,  # type: ignore[arg-type]  # the stub says str | PathLike; a file object works
                          dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    meta = {"koala_model_version": str(card["version"]), "koala_round": str(card.get("round")),
            "input_layout": "NHWC", "classes": ",".join(card["output"]["classes"]),
            "normalisation": card["input"]["normalisation"].get("formula", "")}  # fmt: skip
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    atomic_write(path, proto.SerializeToString())


def ensure_small(edir: str | Path, arch: str, fmt: str) -> Path:
    """The float or int8 LiteRT model of the global small model `arch` in an export directory."""
    edir = Path(edir)
    if fmt not in SMALL_FORMATS:
        raise ExportError(f"unknown small-model format {fmt!r}; formats: {', '.join(SMALL_FORMATS)}")
    card = read_card(edir)
    if arch not in card.get("small", {}):
        known = ", ".join(sorted(card.get("small", {}))) or "none"
        raise ExportError(f"version {card['version']} has no global small model {arch!r}; architectures: {known}")
    path = edir / "small" / f"{arch}.{fmt}.tflite"
    if path.is_file():
        return path
    from safetensors.numpy import load_file

    info = card["small"][arch]
    cal = edir.parent / CALIBRATION
    with _build_lock:
        if path.is_file():
            return path
        man = _small_manifest(arch, tuple(info["input_shape"]))  # type: ignore[arg-type]
        if man.sha256 != info["artifact_sha256"]:
            raise ExportError(f"{arch}: the installed artifact {man.name} is not the one this version was trained "
                              f"with (sha256 {man.sha256[:12]} != {info['artifact_sha256'][:12]})")  # fmt: skip
        named = load_file(str(edir / "small" / f"{arch}.safetensors"))
        ws = [named[n] for n in man.weight_names]
        base = man.inference_path.read_bytes()
        if fmt == "float":
            from device_firmware_py.runtime.quantize import patch_inference_model

            atomic_write(path, patch_inference_model(man.raw, base, ws))
        else:
            if not cal.is_file():
                raise ExportError(f"no calibration rows ({cal}) for the int8 model: written by a server that "
                                  "knows its proxy set")  # fmt: skip
            from device_firmware_py.runtime.quantize import quantize_int8_bytes

            atomic_write(path, quantize_int8_bytes(man.raw, base, ws, np.load(cal, allow_pickle=False)))
    return path


def prebuild(edir: str | Path) -> None:
    """Every derived format of one export (the server's background thread)."""
    card = read_card(edir)
    for fmt in ("pt", "torchscript", "onnx"):
        ensure_format(edir, fmt)
    for arch in card.get("small", {}):
        for fmt in SMALL_FORMATS:
            try:
                ensure_small(edir, arch, fmt)
            except ExportError as exc:
                log.warning("small model %s %s not built: %s", arch, fmt, exc)


# ------------------------------------------------------------------------------------ the server side
class ModelExporter:
    """Writes the export of every model version the orchestrator publishes (its `on_model` hook).

    The portable part (safetensors + card + small float models) is written synchronously -- a few
    milliseconds, and it must exist when the API lists the version; the derived formats (ONNX,
    TorchScript, int8) are built by one background thread, newest version only, so a round is never
    delayed by an ONNX export. A failure is logged; it never fails the round."""

    def __init__(self, models_dir: str | Path, ctx: ExportContext, prebuild: bool = True) -> None:
        self.models_dir = Path(models_dir)
        self.ctx = ctx
        self.prebuild = prebuild
        self._pending: Path | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def publish(self, version: int, round_id: int | None, metrics: dict[str, Any], state: dict[str, Any]) -> Path | None:
        """Export `version` unless it is already (a version's weights never change: a restarted
        server calls this for the version it restored, and only a missing export is written)."""
        done = export_dir(self.models_dir, version)
        if _exported(done, state):
            return done
        try:
            out = write_export(self.models_dir, version, state, self.ctx, round_id=round_id, metrics=metrics)
        except Exception:
            log.exception("model export failed version=%d", version)
            return None
        log.info("model exported version=%d dir=%s", version, out)
        if self.prebuild:
            with self._lock:
                self._pending = out  # a newer version replaces one not started yet
                if self._thread is None:
                    self._thread = threading.Thread(target=self._derive, name="koala-export", daemon=True)
                    self._thread.start()
        return out

    def _derive(self) -> None:
        while True:
            with self._lock:
                edir, self._pending = self._pending, None
                if edir is None:
                    self._thread = None  # under the lock: the next publish starts a new thread
                    return
            try:
                prebuild(edir)
                log.info("model formats built dir=%s", edir)
            except Exception:
                log.exception("building model formats failed dir=%s", edir)

    def wait_idle(self, timeout_s: float = 120.0) -> bool:
        """Tests and shutdown: wait until the background builds are done; False on timeout."""
        import time

        t_end = time.monotonic() + timeout_s
        while True:
            with self._lock:
                t = self._thread
            if t is None:
                return True
            if time.monotonic() >= t_end:
                return False
            t.join(min(0.5, max(0.01, t_end - time.monotonic())))


# ------------------------------------------------------------------------- what the API and CLI serve
def large_file(checkpoint: str | Path, fmt: str) -> tuple[Path, str | None]:
    """The file to serve for a format of a registered large-model version's portable export, and the
    sha256 recorded in its card when there is one (safetensors: a file changed on disk afterwards is
    then detected by the client). FileNotFoundError / ExportError / CardError say why not."""
    try:
        edir = export_dir_of_checkpoint(checkpoint)
    except ExportError as exc:
        raise FileNotFoundError(f"no portable export: {exc}") from None
    if not (edir / CARD_NAME).is_file():
        raise FileNotFoundError(f"no portable export at {edir} (servers write one after every model version; for an "
                                "older one run `koala models export --data-dir DIR VERSION` on the server)")  # fmt: skip
    path = ensure_format(edir, fmt)
    recorded = read_card(edir).get("files", {}).get(path.name, {}).get("sha256")
    return path, recorded


def small_models(edir: str | Path) -> list[dict[str, Any]]:
    """The global small models of one export: [{arch, artifact, input_shape, num_classes, formats}]."""
    card = read_card(edir)
    out = []
    for arch, info in sorted(card.get("small", {}).items()):
        out.append({"arch": arch, "version": card["version"], "round": card.get("round"), "artifact": info["artifact"],
                    "input_shape": info["input_shape"], "num_classes": info["num_classes"],
                    "param_count": info.get("param_count"),
                    "built": [f for f in SMALL_FORMATS if (Path(edir) / "small" / f"{arch}.{f}.tflite").is_file()]})  # fmt: skip
    return out
