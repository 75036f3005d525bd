"""The dictionary artifact: a folder with ``manifest.json`` and safetensors files
(docs/ARCHITECTURE.md §4).

    manifest.json           schema version, model identity + fingerprint, hook semantics, mode,
                            layers, d_model, scales, per-layer SAE configs, affine fit summary,
                            training summary, training context (how training read text:
                            :mod:`resae_serve.context`), SHA-256 of every tensor file
    sae.<layer>.safetensors W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec[, threshold]
    affine.safetensors      A.<layer> [d, d], c.<layer> [d] into each residualized layer

Loading validates everything it reads and names the file and field at fault. Manifests of older
schema versions are upgraded by the explicit functions in :data:`UPGRADES`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from resae_serve import __version__
from resae_serve.cache import atomic_folder, sha256_file
from resae_serve.context import ContextError, TrainingContext
from resae_serve.errors import ResaeError
from resae_serve.resae import MODES, ReSAE
from resae_serve.saes import SAEConfig, sae_from_tensors

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
AFFINE_FILE = "affine.safetensors"
ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HOOK = {
    "point": "block_output",
    "huggingface": "hidden_states[layer + 1] (the last block: before the final norm)",
    "vllm": "hidden_states + residual after the decoder layer (deferred residual add)",
}


class ArtifactError(ResaeError):
    """A dictionary folder is missing, corrupted, of an unknown version, or for another model."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a dictionary belongs to."""

    name: str
    """What the user called it (embedded name or folder)."""
    fingerprint: str
    """:func:`resae_serve.fingerprint.model_fingerprint` of the model folder."""
    model_type: str
    """Hugging Face ``config.model_type``."""
    n_layers: int
    """Number of decoder blocks."""
    d_model: int
    """Width of the residual stream."""


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``."""

    model: ModelIdentity
    mode: str
    layers: tuple[int, ...]
    d_model: int
    scales: tuple[float, ...]
    sae_configs: tuple[SAEConfig, ...]
    affine: tuple[dict[str, Any], ...] = ()
    training: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    context: TrainingContext = field(default_factory=TrainingContext.unknown)
    """How training read text; :meth:`TrainingContext.unknown` when the manifest has no
    ``training_context`` (older manifests): the first-position rule only."""


def _sae_file(layer: int) -> str:
    return f"sae.{layer}.safetensors"


def save_artifact(
    resae: ReSAE, folder: Path, model: ModelIdentity, *,
    affine_summary: list[dict[str, Any]] | None = None, training: dict[str, Any] | None = None,
    context: TrainingContext | None = None,
) -> Path:
    """Write ``resae`` as a dictionary folder (atomically replacing ``folder``); ``context``
    (default :meth:`TrainingContext.unknown`) records how training read text."""
    if resae.d_model != model.d_model:
        raise ArtifactError(f"ReSAE d_model={resae.d_model} but model d_model={model.d_model}")
    context = context or TrainingContext.unknown()
    try:
        context.check_layers(len(resae.layers), str(folder))
    except ContextError as exc:
        raise ArtifactError(str(exc)) from exc
    with atomic_folder(folder) as tmp:
        files: dict[str, str] = {}
        saes = []
        for layer, sae in zip(resae.layers, resae.saes, strict=True):
            inference = sae.inference_sae()
            name = _sae_file(layer)
            tensors = {k: v.detach().contiguous().cpu()
                       for k, v in inference.inference_tensors().items()}
            save_file(tensors, str(tmp / name))
            saes.append({"layer": layer, "file": name, "config": inference.config.to_dict()})
        if resae.mode == "resae":
            tensors = {}
            for i, layer in enumerate(resae.layers[1:], start=1):
                A, c = resae.affine_map(i)
                tensors[f"A.{layer}"] = A.detach().contiguous().cpu()
                tensors[f"c.{layer}"] = c.detach().contiguous().cpu()
            save_file(tensors, str(tmp / AFFINE_FILE))
        for path in sorted(tmp.iterdir()):
            files[path.name] = sha256_file(path)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": "resae-dictionary",
            "package_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": model.__dict__,
            "hook": HOOK,
            "mode": resae.mode,
            "layers": list(resae.layers),
            "d_model": resae.d_model,
            "scales": [float(s) for s in resae.scales.tolist()],
            "saes": saes,
            "affine": affine_summary or [],
            "training": training or {},
            "training_context": context.to_dict(),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("saved %s dictionary (layers %s) to %s", resae.mode, list(resae.layers), folder)
    return folder


# ---------------------------------------------------------------------- schema upgrades


def _upgrade_0_to_1(manifest: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (pre-release) called d_model ``d_in`` and the scales ``sigmas``."""
    out = {k: v for k, v in manifest.items() if k not in {"d_in", "sigmas"}}
    out["d_model"] = manifest["d_in"]
    out["scales"] = manifest["sigmas"]
    out["hook"] = manifest.get("hook", HOOK)
    out["schema_version"] = 1
    return out


UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _upgrade_0_to_1}
"""``UPGRADES[v]`` turns a version-``v`` manifest into version ``v + 1``."""


def upgrade_manifest(manifest: dict[str, Any], where: Path) -> dict[str, Any]:
    """Upgrade a manifest to :data:`SCHEMA_VERSION` step by step."""
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{where}: field 'schema_version' is {version!r}; expected an integer")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{where}: schema_version={version} was written by a newer resae-serve "
            f"(this one reads up to {SCHEMA_VERSION}); upgrade resae-serve"
        )
    while version < SCHEMA_VERSION:
        if version not in UPGRADES:
            raise ArtifactError(f"{where}: no upgrade from schema_version={version}")
        try:
            manifest = UPGRADES[version](manifest)
        except KeyError as exc:
            raise ArtifactError(f"{where}: schema_version={version} manifest lacks field "
                                f"{exc.args[0]!r}") from exc
        version = manifest["schema_version"]
        logger.info("upgraded %s to schema_version %d", where, version)
    return manifest


# ---------------------------------------------------------------------- loading


def _require(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in manifest:
        raise ArtifactError(f"{where}: field {key!r} is missing")
    value = manifest[key]
    if not isinstance(value, kind):
        raise ArtifactError(f"{where}: field {key!r} is {value!r}; expected {kind}")
    return value


def read_json_object(path: Path, missing_hint: str) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file (``missing_hint`` ends the first)."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {missing_hint}")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return raw


def read_manifest(folder: Path) -> Manifest:
    """Parse, upgrade and check ``manifest.json`` (no tensors are read)."""
    path = folder / MANIFEST
    raw = read_json_object(path, f"{folder} is not a resae dictionary folder")
    raw = upgrade_manifest(raw, path)
    mode = _require(raw, "mode", str, path)
    if mode not in MODES:
        raise ArtifactError(f"{path}: field 'mode' is {mode!r}; allowed: {', '.join(MODES)}")
    layers = tuple(_require(raw, "layers", list, path))
    d_model = _require(raw, "d_model", int, path)
    scales = tuple(float(s) for s in _require(raw, "scales", list, path))
    entries = _require(raw, "saes", list, path)
    if not layers or list(layers) != sorted(set(layers)):
        raise ArtifactError(f"{path}: field 'layers' is {list(layers)}; expected strictly "
                            "increasing block indices")
    if len(scales) != len(layers) or len(entries) != len(layers):
        raise ArtifactError(f"{path}: {len(layers)} layers but {len(scales)} scales and "
                            f"{len(entries)} saes entries")
    if not all(s > 0 and s == s and s != float("inf") for s in scales):
        raise ArtifactError(f"{path}: field 'scales' must hold finite positive numbers")
    configs = []
    for i, entry in enumerate(entries):
        if entry.get("layer") != layers[i]:
            raise ArtifactError(f"{path}: saes[{i}].layer is {entry.get('layer')!r}; "
                                f"expected {layers[i]}")
        try:
            config = SAEConfig.from_dict(entry["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}: saes[{i}].config is invalid: {exc}") from exc
        if config.d_in != d_model:
            raise ArtifactError(f"{path}: saes[{i}].config.d_in={config.d_in}; "
                                f"d_model is {d_model}")
        configs.append(config)
    model = _require(raw, "model", dict, path)
    try:
        identity = ModelIdentity(**model)
    except TypeError as exc:
        raise ArtifactError(f"{path}: field 'model' is invalid: {exc}") from exc
    try:
        context = TrainingContext.from_dict(raw.get("training_context"))
        context.check_layers(len(layers), str(path))
    except ContextError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
    return Manifest(identity, mode, layers, d_model, scales, tuple(configs),
                    tuple(raw.get("affine", [])), dict(raw.get("training", {})),
                    raw["schema_version"], context)


def _load_tensors(path: Path, recorded: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    if recorded is not None and (actual := sha256_file(path)) != recorded:
        raise ArtifactError(f"{path} is corrupted: SHA-256 {actual[:16]}… differs from the "
                            f"manifest's {recorded[:16]}…")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    for name, tensor in tensors.items():
        if tensor.dtype not in ALLOWED_DTYPES:
            raise ArtifactError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; allowed: "
                                "float32, bfloat16, float16")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ArtifactError(f"{path}: tensor {name!r} has {bad} non-finite values")
    return tensors


def load_artifact(folder: Path, *, expect_fingerprint: str | None = None) -> tuple[ReSAE, Manifest]:
    """Load and validate a dictionary folder; with ``expect_fingerprint`` check the model."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if expect_fingerprint is not None and manifest.model.fingerprint != expect_fingerprint:
        raise ArtifactError(
            f"{folder / MANIFEST}: field 'model.fingerprint' is {manifest.model.fingerprint} "
            f"(model {manifest.model.name!r}), but the model given has {expect_fingerprint}; "
            "this dictionary was trained on a different model"
        )
    recorded: dict[str, str] = json.loads((folder / MANIFEST).read_text()).get("files", {})
    saes = []
    for layer, config in zip(manifest.layers, manifest.sae_configs, strict=True):
        path = folder / _sae_file(layer)
        tensors = _load_tensors(path, recorded.get(path.name))
        try:
            saes.append(sae_from_tensors(config, tensors))
        except ValueError as exc:
            raise ArtifactError(f"{path}: {exc}") from exc
    affine: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]
    if manifest.mode == "resae" and len(manifest.layers) > 1:
        path = folder / AFFINE_FILE
        tensors = _load_tensors(path, recorded.get(AFFINE_FILE))
        for layer in manifest.layers[1:]:
            for key in (f"A.{layer}", f"c.{layer}"):
                if key not in tensors:
                    raise ArtifactError(f"{path}: tensor {key!r} is missing")
            affine.append((tensors[f"A.{layer}"], tensors[f"c.{layer}"]))
    try:
        resae = ReSAE(manifest.layers, saes, manifest.scales, mode=manifest.mode,  # type: ignore[arg-type]
                      affine=affine if manifest.mode == "resae" else None)
    except ValueError as exc:
        raise ArtifactError(f"{folder}: {exc}") from exc
    return resae, manifest
