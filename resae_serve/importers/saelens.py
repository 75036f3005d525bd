"""Import SAELens SAE folders (5.x and 6.x): ``cfg.json`` + ``sae_weights.safetensors``.

Format followed: the SAELens **6.x** ``cfg.json`` (``SAEConfig.to_dict`` in
``sae_lens/saes/sae.py``; ``saes/standard_sae.py``, ``saes/topk_sae.py``,
``saes/jumprelu_sae.py``; file names in ``sae_lens/constants.py``; repository
decoderesearch/SAELens, formerly jbloomAus/SAELens) and the flat **5.x** layout that SAELens 6
still reads (``handle_pre_6_0_config`` in ``sae_lens/loading/pretrained_sae_loaders.py``):
``hook_name`` / ``hook_point`` and ``hook_layer`` at the top level, ``activation_fn_str`` (or
``activation_fn``) with ``activation_fn_kwargs {"k": …}``, architecture ``"standard"`` +
activation ``"topk"`` meaning TopK, a boolean ``normalize_activations``.

Architectures: SAELens ``standard`` (ReLU) → ours ``relu``; ``topk`` → ``topk`` (``k``);
``jumprelu`` → ``jumprelu`` (SAELens keeps ``relu(pre) · (pre > threshold)``, the same codes
as ours). Options folded into the weights, in SAELens' own order, so that our codes equal
SAELens' ``encode``:

- 5.x ``finetuning_scaling_factor`` tensor (scales codes before ``W_dec``) → ``W_dec``;
- ``normalize_activations: expected_average_only_in`` with the training folder's
  ``activation_scaler.json`` → ``fold_activation_norm_scaling_factor`` (``sae.py``);
- ``normalize_activations: covariance_whitening`` with ``activation_whitening.safetensors`` →
  ``fold_activation_whitening`` (``sae.py``; TopK folds its decoder norms first, as there);
- TopK ``rescale_acts_by_decoder_norm`` → decoder norms moved into the encoder
  (``fold_W_dec_norm``);
- ``apply_b_dec_to_input: false`` → ``b_enc += b_dec W_enc``.

Refused, naming the file: ``layer_norm`` and ``constant_norm_rescale`` (per-token, not linear),
``model_from_pretrained_kwargs.center_writing_weights`` (TransformerLens' centred stream),
a scaling factor or whitening that the folder does not hold, other architectures (gated,
transcoders, …), ``hook_z`` reshaping, a head index, hook points other than block outputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from resae_serve.artifact import ArtifactError, ModelIdentity, read_json_object
from resae_serve.importers.common import (
    ImportedSAE,
    build_sae,
    check_shapes,
    expand_folders,
    fold_input_bias,
    resolve_layer,
    sae_config,
)
from resae_serve.importers.hooks import parse_hook
from resae_serve.saes import SAE, Architecture, SAEConfig

logger = logging.getLogger(__name__)

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
WHITENING_FILE = "activation_whitening.safetensors"

FROM_SAELENS: dict[str, Architecture] = {"topk": "topk", "jumprelu": "jumprelu",
                                         "standard": "relu"}
FOLDABLE_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")


@dataclass(frozen=True)
class SAELensConfig:
    """What import needs from one SAELens ``cfg.json`` (5.x or 6.x), already checked."""

    path: Path
    """The ``cfg.json`` read."""
    architecture: Architecture
    """Our architecture name."""
    d_in: int
    d_sae: int
    k: int | None
    """Active latents per token (TopK only)."""
    hook_name: str | None
    hook_layer: int | None
    """5.x ``hook_layer`` (the number in the hook name) when present."""
    normalize_activations: str
    """One of :data:`FOLDABLE_NORMALIZATIONS`."""
    apply_b_dec_to_input: bool
    rescale_acts_by_decoder_norm: bool
    resae_config: dict[str, Any] | None
    """Our ``SAEConfig`` as recorded by :func:`~resae_serve.saelens_io.export_saelens`."""


def find(paths: list[Path]) -> list[Path]:
    """SAELens SAE folders among ``paths`` (a folder of SAE folders expands to them)."""
    return expand_folders(paths, SAELENS_CFG_FILE, "SAELens SAE")


def read(folder: Path, *, model: ModelIdentity, layer: int | None = None,
         k: int | None = None) -> ImportedSAE:
    """The SAELens SAE in ``folder``; ``layer`` (optional) must agree with its hook name."""
    spec = read_saelens_config(folder)
    hook = parse_hook(str(spec.hook_name), str(spec.path)) if spec.hook_name is not None else None
    if hook is not None and spec.hook_layer is not None and spec.hook_layer != hook.index:
        raise ArtifactError(f"{spec.path}: hook_layer={spec.hook_layer} disagrees with "
                            f"hook_name={spec.hook_name!r}")
    chosen = resolve_layer(spec.path, {"hook_name": hook.layer if hook else None,
                                       "hook_layer": spec.hook_layer if hook is None else None,
                                       "layers": layer}, model)
    return ImportedSAE(chosen, load_saelens_sae(folder, spec, k=k), spec.path, spec.hook_name)


def read_saelens_config(folder: Path) -> SAELensConfig:
    """Parse and check ``folder/cfg.json`` (6.x nested metadata or 5.x flat layout)."""
    path = Path(folder) / SAELENS_CFG_FILE
    raw = read_json_object(path, f"{folder} is not a SAELens SAE folder")
    metadata: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    merged = {**raw, **metadata}  # 5.x keeps metadata at the top level
    normalize = merged.get("normalize_activations", "none")
    if normalize in (None, False):
        normalize = "none"
    elif normalize is True:  # 5.x boolean, as handle_pre_6_0_config reads it
        normalize = "expected_average_only_in"
    if normalize in ("layer_norm", "constant_norm_rescale"):
        raise ArtifactError(
            f"{path}: normalize_activations={normalize!r} rescales each token by its own "
            "statistics, which no linear weights can express; allowed: "
            f"{', '.join(FOLDABLE_NORMALIZATIONS)}")
    if normalize not in FOLDABLE_NORMALIZATIONS:
        raise ArtifactError(f"{path}: normalize_activations={normalize!r} is unknown; allowed: "
                            f"{', '.join(FOLDABLE_NORMALIZATIONS)}")
    reshape = merged.get("reshape_activations", "none")
    if reshape not in (None, "none"):
        raise ArtifactError(f"{path}: reshape_activations={reshape!r} (attention hook_z); "
                            "allowed: 'none' on a block output")
    head = merged.get("hook_head_index", merged.get("hook_point_head_index"))
    if head is not None:
        raise ArtifactError(f"{path}: hook_head_index={head!r} reads one attention head; "
                            "allowed: null (a whole block output)")
    loading = merged.get("model_from_pretrained_kwargs")
    if isinstance(loading, dict) and loading.get("center_writing_weights"):
        raise ArtifactError(
            f"{path}: model_from_pretrained_kwargs.center_writing_weights is true: the SAE "
            "reads TransformerLens' centred residual stream, not the model's block outputs; "
            "allowed: false (SAELens trains on from_pretrained_no_processing)")
    architecture, k = _architecture(raw, path)
    d_in, d_sae = _positive_int(raw, "d_in", path), _positive_int(raw, "d_sae", path)
    hook_layer = merged.get("hook_layer", merged.get("hook_point_layer"))
    hook_name = merged.get("hook_name", merged.get("hook_point"))
    ours = metadata.get("resae_serve")
    recorded = ours.get("sae_config") if isinstance(ours, dict) else None
    return SAELensConfig(
        path=path, architecture=architecture, d_in=d_in, d_sae=d_sae, k=k,
        hook_name=str(hook_name) if hook_name is not None else None,
        hook_layer=hook_layer if isinstance(hook_layer, int) else None,
        normalize_activations=normalize,
        apply_b_dec_to_input=bool(merged.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
        resae_config=recorded if isinstance(recorded, dict) else None,
    )


def _architecture(raw: dict[str, Any], path: Path) -> tuple[Architecture, int | None]:
    """Our architecture and TopK ``k`` from a 6.x or 5.x config."""
    name = raw.get("architecture", "standard")
    activation = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
    kwargs = raw.get("activation_fn_kwargs") or {}
    if name == "standard" and activation == "topk":  # 5.x spelling of a TopK SAE
        name = "topk"
    elif name in ("standard", "jumprelu") and activation not in ("relu", None):
        raise ArtifactError(f"{path}: activation_fn={activation!r} with architecture={name!r}; "
                            "only 'relu' (or 5.x 'topk') can be imported")
    if name not in FROM_SAELENS:
        raise ArtifactError(f"{path}: architecture={name!r} cannot be imported; allowed: "
                            f"{', '.join(FROM_SAELENS)}")
    if name != "topk":
        return FROM_SAELENS[name], None
    k = raw.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ArtifactError(f"{path}: TopK needs an integer k >= 1 ('k', or 5.x "
                            f"'activation_fn_kwargs.k'); found {k!r}")
    return "topk", k


def _positive_int(raw: dict[str, Any], key: str, path: Path) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArtifactError(f"{path}: field {key!r} is {value!r}; expected an integer >= 1")
    return value


def _load(path: Path, hint: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc


def load_saelens_sae(folder: Path, spec: SAELensConfig, *, k: int | None = None) -> SAE:
    """Our SAE holding the weights of ``folder/sae_weights.safetensors`` (options folded)."""
    path = Path(folder) / SAELENS_WEIGHTS_FILE
    tensors = _load(path, f"{folder} is not a complete SAELens SAE folder")
    if "log_threshold" in tensors and "threshold" not in tensors:  # JumpReLU training form
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    config = _sae_config(spec, k)
    check_shapes(path, tensors, config)
    dtype = tensors["W_enc"].dtype
    folded = _fold_options({name: t.double() for name, t in tensors.items()}, spec, Path(folder))
    return build_sae(path, config, folded, dtype)


def _fold_options(t: dict[str, torch.Tensor], spec: SAELensConfig, folder: Path
                  ) -> dict[str, torch.Tensor]:
    """Fold SAELens-only options into plain weights (float64), in SAELens' order."""
    t = dict(t)
    for name in ("finetuning_scaling_factor", "scaling_factor"):  # 5.x: scales z before W_dec
        if name in t:
            t["W_dec"] = t["W_dec"] * t.pop(name)[:, None]
    rescale = spec.rescale_acts_by_decoder_norm
    if spec.normalize_activations == "expected_average_only_in":
        factor = _scaling_factor(folder, spec)  # sae.fold_activation_norm_scaling_factor
        t["W_enc"] = t["W_enc"] * factor
        t["W_dec"] = t["W_dec"] / factor
        t["b_dec"] = t["b_dec"] / factor
    elif spec.normalize_activations == "covariance_whitening":
        mean, M, M_inv = _whitening(folder, spec)  # sae.fold_activation_whitening
        if rescale:  # TopKSAE.fold_activation_whitening folds the decoder norms first
            t, rescale = _fold_decoder_norm(t), False
        t["W_enc"] = M @ t["W_enc"]
        if not spec.apply_b_dec_to_input:
            t["b_enc"] = t["b_enc"] - mean @ t["W_enc"]
        t["W_dec"], t["b_dec"] = t["W_dec"] @ M_inv, t["b_dec"] @ M_inv + mean
    if rescale:  # topk(pre · n), decode (z / n) W_dec
        t = _fold_decoder_norm(t)
    return t if spec.apply_b_dec_to_input else fold_input_bias(t)


def _fold_decoder_norm(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norms = t["W_dec"].norm(dim=1)  # (d_sae,)
    return {**t, "W_enc": t["W_enc"] * norms, "b_enc": t["b_enc"] * norms,
            "W_dec": t["W_dec"] / norms.clamp_min(1e-12)[:, None]}


def _scaling_factor(folder: Path, spec: SAELensConfig) -> float:
    path = folder / SCALER_FILE
    hint = ("SAELens folds the factor into the weights when training ends and then writes "
            "'none'; import that final SAE, or fold it with "
            "sae.fold_activation_norm_scaling_factor(f) and save again")
    if not path.is_file():
        raise ArtifactError(f"{spec.path}: normalize_activations='expected_average_only_in' "
                            f"but {path} is missing. {hint}")
    try:
        factor = json.loads(path.read_text()).get("scaling_factor")
    except (ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path} is not a SAELens activation scaler: {exc}") from exc
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ArtifactError(f"{path}: field 'scaling_factor' is {factor!r}; expected a "
                            f"number > 0. {hint}")
    return float(factor)


def _whitening(folder: Path, spec: SAELensConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = folder / WHITENING_FILE
    stats = _load(path, f"{spec.path} says normalize_activations='covariance_whitening'; "
                  "SAELens saves the statistics there beside activation_scaler.json")
    d_in = spec.d_in
    shapes = {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)}
    for name, shape in shapes.items():
        if name not in stats or tuple(stats[name].shape) != shape:
            got = list(stats[name].shape) if name in stats else "missing"
            raise ArtifactError(f"{path}: tensor {name!r} is {got}; expected {list(shape)}")
    return stats["mean"].double(), stats["matrix"].double(), stats["inverse_matrix"].double()


def _sae_config(spec: SAELensConfig, k: int | None) -> SAEConfig:
    """Our config: a resae-serve export's recorded one when consistent, else defaults.

    TopK keeps its own ``k``; ``k`` (if given) sets the codes kept per token of the others.
    """
    recorded = _recorded_config(spec)
    if recorded is not None and (spec.k is not None or k is None):
        return dataclasses.replace(recorded, k=spec.k if spec.k is not None else recorded.k)
    return sae_config(spec.path, spec.architecture, spec.d_in, spec.d_sae,
                      spec.k if spec.k is not None else k)


def _recorded_config(spec: SAELensConfig) -> SAEConfig | None:
    if spec.resae_config is None:
        return None
    try:
        recorded = SAEConfig.from_dict(spec.resae_config)
    except (TypeError, ValueError) as exc:
        logger.warning("%s: ignoring metadata.resae_serve.sae_config (%s)", spec.path, exc)
        return None
    if (recorded.architecture, recorded.d_in, recorded.d_sae) != (
        spec.architecture, spec.d_in, spec.d_sae
    ):
        logger.warning("%s: metadata.resae_serve.sae_config does not match the SAELens "
                       "fields; ignoring it", spec.path)
        return None
    return recorded
