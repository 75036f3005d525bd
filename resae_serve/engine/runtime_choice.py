"""Which feature runtime the engine's monitor encodes with (``--runtime``), and its export.

``auto`` picks, on a CPU host, onnxruntime with its CPU execution provider (the export's
per-layer encode measured 2-2.5x faster than torch at 8-32 tokens here;
:mod:`~resae_serve.engine.encoders`); on a GPU host TensorRT when installed, else onnxruntime
when it has the CUDA or TensorRT execution provider, else torch; where nothing better is
installed, torch, with a log line saying why. A runtime asked for by name that cannot run here
is refused at start with what is allowed. Steering itself always stays in the compiled torch
graph (the ``resae::steer`` op); only the monitor's encodes (and the front end's) move.

The export comes from the folder served (``resae serve EXPORT_FOLDER``: its manifest names the
source dictionary, checked by fingerprint) or is built once into the cache
(:func:`resae_serve.export.cache.cached_export`).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, NamedTuple

from resae_serve.errors import ResaeError

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime", "tensorrt")
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class RuntimeUnavailableError(ResaeError):
    """The runtime asked for cannot run here (not installed, or no GPU for it)."""


class RuntimeChoice(NamedTuple):
    """The runtime to run, and why."""

    backend: str
    """``torch``, ``onnxruntime`` or ``tensorrt``."""
    provider: str
    """onnxruntime's execution provider (``cpu``, or ``auto``: TensorRT then CUDA); else ''."""
    reason: str


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _ort_providers() -> list[str]:
    if not _installed("onnxruntime"):
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def available_runtimes(*, cuda: bool) -> list[str]:
    """The runtimes that can run on this host (``auto`` and ``torch`` always can)."""
    providers = _ort_providers()
    out = ["auto", "torch"]
    if providers and (not cuda or any(p in providers for p in _GPU_PROVIDERS)):
        out.append("onnxruntime")
    if cuda and _installed("tensorrt"):
        out.append("tensorrt")
    return out


def choose_runtime(requested: str, *, cuda: bool, log: bool = True) -> RuntimeChoice:
    """The runtime ``requested`` (one of :data:`RUNTIMES`) means on this host; raises
    :class:`RuntimeUnavailableError` for one that cannot run here, naming what can. ``log``:
    say what ``auto`` chose, and why."""
    if requested not in RUNTIMES:
        raise ValueError(f"runtime={requested!r}; allowed: {', '.join(RUNTIMES)}")
    allowed = available_runtimes(cuda=cuda)
    host = "GPU" if cuda else "CPU"
    if requested == "auto":
        choice = _auto(cuda, allowed)
        if log:
            say = logger.warning if choice.backend == "torch" else logger.info
            say("feature runtime %s (%s)", choice.backend, choice.reason)
        return choice
    if requested not in allowed:
        why = {"onnxruntime": "onnxruntime is not installed (pip install onnxruntime)"
               if not cuda else "onnxruntime has no CUDA or TensorRT execution provider here "
               "(pip install onnxruntime-gpu)",
               "tensorrt": "TensorRT needs a CUDA GPU" if not cuda
               else "tensorrt is not installed (pip install tensorrt)"}[requested]
        raise RuntimeUnavailableError(f"runtime={requested!r} (--runtime) cannot run on this "
                                      f"{host} host: {why}; allowed here: {', '.join(allowed)}")
    provider = ("cpu" if not cuda else "auto") if requested == "onnxruntime" else ""
    return RuntimeChoice(requested, provider, f"--runtime {requested}")


def _auto(cuda: bool, allowed: list[str]) -> RuntimeChoice:
    if not all(_installed(name) for name in ("onnx", "onnxscript")):   # cannot export
        return RuntimeChoice("torch", "", f"auto on a {'GPU' if cuda else 'CPU'} host: the "
                             "ONNX exporter (onnx, onnxscript) is not installed (pip install "
                             "'resae-serve[cpu]'), so torch")
    if not cuda:
        if "onnxruntime" in allowed:
            return RuntimeChoice("onnxruntime", "cpu",
                                 "auto on a CPU host: onnxruntime, CPU execution provider")
        return RuntimeChoice("torch", "", "auto on a CPU host: onnxruntime is not installed "
                             "(pip install onnxruntime), so torch")
    if "tensorrt" in allowed:
        return RuntimeChoice("tensorrt", "", "auto on a GPU host: TensorRT is installed")
    if "onnxruntime" in allowed:
        return RuntimeChoice("onnxruntime", "auto", "auto on a GPU host: onnxruntime with "
                             "its TensorRT / CUDA execution provider")
    return RuntimeChoice("torch", "", "auto on a GPU host: neither tensorrt nor onnxruntime "
                         "with a CUDA provider is installed (pip install 'resae-serve[gpu]'), "
                         "so torch")


def served_folders(folder: Path) -> tuple[Path, Path | None]:
    """``(dictionary, export)`` of a folder given to serve: a dictionary folder (no export
    yet), or an export folder and the dictionary its manifest names."""
    from resae_serve.export.folder import read_export_manifest
    from resae_serve.export.spec import EXPORT_MANIFEST

    folder = Path(folder)
    if not (folder / EXPORT_MANIFEST).is_file():
        return folder, None
    manifest = read_export_manifest(folder)
    source = str(manifest.artifact.get("path") or "")
    if not source or not Path(source).is_dir():
        raise ValueError(f"{folder / EXPORT_MANIFEST}: field 'artifact.path' names the "
                         f"dictionary {source or '(none)'!r}, which is not a folder here; "
                         "serve the dictionary folder itself")
    return Path(source), folder


def prepare_export(dictionary: Path, export: Path | None = None) -> Path:
    """The export folder to serve ``dictionary`` from: ``export`` after checking that it holds
    this dictionary (layout and fingerprint), or the cached export, built on first use."""
    from resae_serve.artifact import load_artifact
    from resae_serve.export.cache import cached_export, check_export_matches
    from resae_serve.export.folder import read_export_manifest

    if export is None:
        return cached_export(Path(dictionary)).folder
    resae, manifest = load_artifact(Path(dictionary))
    check_export_matches(read_export_manifest(Path(export)), resae,
                         model_fingerprint=manifest.model.fingerprint)
    return Path(export)


def runtime_overrides(choice: RuntimeChoice, export: Path | None) -> dict[str, Any]:
    """``hf_overrides`` entries that tell the worker what to build
    (:func:`resae_serve.engine.encoders.build_encoder`)."""
    return {"resae_runtime": choice.backend, "resae_runtime_provider": choice.provider or "auto",
            "resae_runtime_reason": choice.reason,
            "resae_export": str(Path(export).resolve()) if export is not None else ""}
