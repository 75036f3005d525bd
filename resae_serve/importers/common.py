"""What every importer shares: the model's identity, layers, tensor folding, the saved folder.

An importer reads one SAE of another library into an :class:`ImportedSAE` (our SAE, with every
library-specific option folded into plain ``W_enc, b_enc, W_dec, b_dec[, threshold]``) and
:func:`save_imported` writes several of them as one ``layerwise`` dictionary with scale 1.0 per
layer, so each SAE reads raw block outputs exactly as it did in its own library. How the
other library read text is not known: the manifest's training context is
:meth:`~resae_serve.context.TrainingContext.unknown` (source ``imported``): served positions
are flagged by the first-position rule only, never by a norm rule.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resae_serve.artifact import ArtifactError, ModelIdentity, read_json_object, save_artifact
from resae_serve.context import TrainingContext
from resae_serve.resae import ReSAE
from resae_serve.saes import SAE, Architecture, SAEConfig, sae_from_tensors

logger = logging.getLogger(__name__)

DEFAULT_SPARSE_K = 32
"""Codes per token :meth:`SAE.encode_sparse` keeps for imported ReLU / JumpReLU SAEs (capped
at ``d_sae``), unless the caller gives another ``k``; dense encoding keeps every code."""

STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ImportedSAE:
    """One SAE of another library, converted."""

    layer: int
    """The block whose output it reads."""
    sae: SAE
    """Our SAE; encoding raw block outputs gives the source library's codes."""
    where: Path
    """The source file that declares it (named in error messages and the manifest)."""
    hook: str | None
    """The source's hook name, or ``None`` when the layer came from the caller."""


def model_identity(model: str) -> ModelIdentity:
    """The identity of ``model`` (a model folder or embedded name, as the CLI takes it).

    Width and depth come from its ``config.json`` (``hidden_size`` / ``num_hidden_layers``,
    GPT-2's ``n_embd`` / ``n_layer``), the ``text_config`` first when there is one.
    """
    from resae_serve.fingerprint import model_fingerprint
    from resae_serve.models import resolve_model

    folder = resolve_model(model)
    path = folder / "config.json"
    config = read_json_object(path, f"{folder} is not a Hugging Face model folder")
    # As the engine reads it (resae_serve.families): the text config of a multimodal model.
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config

    def first_int(*keys: str) -> int:
        for source in (text, config):
            for key in keys:
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        raise ArtifactError(f"{path}: none of {', '.join(keys)} holds a positive integer")

    # A folder is recorded absolute, so `resae eval` / `features` find it from anywhere.
    name = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else model
    return ModelIdentity(
        name=name, fingerprint=model_fingerprint(folder),
        model_type=str(text.get("model_type", config.get("model_type", "unknown"))),
        n_layers=first_int("num_hidden_layers", "n_layer", "num_layers"),
        d_model=first_int("hidden_size", "n_embd", "d_model"),
    )


def resolve_layer(where: Path, candidates: dict[str, int | None], model: ModelIdentity) -> int:
    """The one layer all non-``None`` ``candidates`` agree on, inside ``model``."""
    known = {name: value for name, value in candidates.items() if value is not None}
    if not known:
        raise ArtifactError(f"{where}: nothing says which layer this SAE reads; pass layers "
                            "(one per SAE, `--layers` on the command line)")
    if len(set(known.values())) > 1:
        raise ArtifactError(f"{where}: the layer is ambiguous: {known}")
    layer = next(iter(known.values()))
    if not 0 <= layer < model.n_layers:
        raise ArtifactError(f"{where}: layer {layer} is outside model {model.name!r} "
                            f"(blocks 0..{model.n_layers - 1})")
    return layer


def natural_key(path: Path) -> list[int | str]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def expand_folders(paths: Sequence[Path], marker: str, kind: str) -> list[Path]:
    """Folders holding ``marker``: each path itself, else its sub-folders that hold one.

    A checkpoint folder of several SAEs (sparsify's one folder per hookpoint, a SAELens
    release) expands to its SAEs in natural order.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / marker).is_file():
            found.append(path)
            continue
        if not path.is_dir():
            raise ArtifactError(f"{path} does not exist or is not a folder; expected a {kind} "
                                f"folder holding {marker}")
        children = sorted((p for p in path.iterdir() if (p / marker).is_file()), key=natural_key)
        if not children:
            raise ArtifactError(f"{path / marker} is missing (and no sub-folder of {path} holds "
                                f"one): {path} is not a {kind} folder")
        found.extend(children)
    return found


def sae_config(where: Path, architecture: Architecture, d_in: int, d_sae: int,
               k: int | None) -> SAEConfig:
    """Our config; ``k`` is TopK's own, or codes kept per token for ReLU / JumpReLU."""
    k = k if k is not None else min(DEFAULT_SPARSE_K, d_sae)
    try:
        return SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, k=k)
    except ValueError as exc:
        raise ArtifactError(f"{where}: {exc}") from exc


def check_shapes(where: Path, tensors: dict[str, torch.Tensor], config: SAEConfig) -> None:
    """Every tensor our ``config`` needs is in ``tensors`` with its shape."""
    from resae_serve.saes import sae_class

    require_shapes(where, tensors, sae_class(config.architecture).tensor_shapes(config),
                   f"d_in={config.d_in}, d_sae={config.d_sae}")


def require_shapes(where: Path, tensors: dict[str, torch.Tensor],
                   expected: dict[str, tuple[int, ...]], sizes: str) -> None:
    """Each ``expected`` tensor is present with its shape; errors name the file and tensor."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ArtifactError(f"{where}: tensor {name!r} is missing; expected "
                                + ", ".join(expected))
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{where}: tensor {name!r} has shape "
                                f"{list(tensors[name].shape)}; expected {list(shape)} ({sizes})")


def fold_input_bias(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of an SAE that does not subtract ``b_dec`` from its input, for ours that does.

    ``x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc)``.
    """
    out = dict(tensors)
    out["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    return out


def build_sae(where: Path, config: SAEConfig, tensors: dict[str, torch.Tensor],
              dtype: torch.dtype) -> SAE:
    """Our SAE from (float64, folded) tensors stored as ``dtype`` (float64 becomes float32)."""
    dtype = dtype if dtype in STORED_DTYPES else torch.float32
    try:
        return sae_from_tensors(config, {k: v.to(dtype).contiguous() for k, v in tensors.items()})
    except ValueError as exc:
        raise ArtifactError(f"{where}: {exc}") from exc


def save_imported(saes: Sequence[ImportedSAE], out_dir: Path, model: ModelIdentity,
                  source: str) -> Path:
    """Write ``saes`` (any order, one per layer) as a layerwise dictionary at ``out_dir``."""
    if not saes:
        raise ArtifactError(f"no {source} SAE to import")
    by_layer: dict[int, ImportedSAE] = {}
    for item in saes:
        if item.sae.config.d_in != model.d_model:
            raise ArtifactError(f"{item.where}: d_in={item.sae.config.d_in}, but model "
                                f"{model.name!r} has d_model={model.d_model}")
        if item.layer in by_layer:
            raise ArtifactError(f"{item.where}: layer {item.layer} already comes from "
                                f"{by_layer[item.layer].where}; give one SAE per layer")
        by_layer[item.layer] = item
    order = sorted(by_layer)
    resae = ReSAE(order, [by_layer[layer].sae for layer in order], [1.0] * len(order),
                  mode="layerwise")
    training = {
        "imported_from": source,
        "sources": {str(layer): str(by_layer[layer].where) for layer in order},
        "hooks": {str(layer): by_layer[layer].hook for layer in order},
    }
    save_artifact(resae, Path(out_dir), model, training=training,
                  context=TrainingContext.unknown("imported"))
    logger.info("imported %d %s SAEs (layers %s) into %s", len(order), source, order, out_dir)
    return Path(out_dir)
