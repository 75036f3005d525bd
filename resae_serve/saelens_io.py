"""Per-layer export of a dictionary to SAELens' on-disk SAE format (docs/ARCHITECTURE.md §4).

SAELens keeps one SAE per folder::

    cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
                              normalize_activations, reshape_activations, k (topk only),
                              metadata {model_name, hook_name, hook_head_index, sae_lens_version, …}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec[, threshold]

Format followed: the SAELens **6.x** ``cfg.json`` (``SAEConfig.to_dict`` in
``sae_lens/saes/sae.py``; ``TopKSAEConfig`` in ``saes/topk_sae.py``; ``saes/jumprelu_sae.py``;
``saes/standard_sae.py``; file names from ``sae_lens/constants.py``; repository
decoderesearch/SAELens, formerly jbloomAus/SAELens). SAELens treats a config whose
``metadata.sae_lens_version`` is missing or older than 6.0 as a 5.x config and rewrites it
(``handle_pre_6_0_config``), dropping the metadata, so export writes ``sae_lens_version: "6.0.0"``
as the format marker (our own version goes under ``metadata.resae_serve``).

Architectures: ours ``topk`` → SAELens ``topk`` (``k``); ``jumprelu`` → ``jumprelu``
(``threshold``; SAELens keeps ``relu(pre) · (pre > threshold)``, our codes); ``relu`` →
``standard``. A BatchTopK layer is already saved as JumpReLU by
:func:`~resae_serve.artifact.save_artifact`.

Scales. Our SAEs read ``h / s`` and reconstruct ``s · (z W_dec + b_dec)``; SAELens SAEs read raw
``h``. Export folds ``s`` in exactly: ``W_enc' = W_enc / s``, ``b_enc' = b_enc``,
``W_dec' = s·W_dec``, ``b_dec' = s·b_dec``, ``threshold' = threshold`` (the pre-activations are
unchanged: ``(h − s b_dec) W_enc / s + b_enc = (h/s − b_dec) W_enc + b_enc``).

Only ``layerwise`` dictionaries export (and one-layer ``resae`` ones, which are the same thing):
a residualized layer reads ``h_m − A h_{m−1} − c``, which a single SAELens SAE on one hook point
cannot express.

Import lives in :mod:`resae_serve.importers.saelens` (sparsify and Gemma Scope beside it);
:func:`import_saelens`, :func:`read_saelens_config` and :func:`load_saelens_sae` are re-exported
here for existing callers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from resae_serve import __version__
from resae_serve.artifact import ArtifactError, ModelIdentity, load_artifact
from resae_serve.cache import atomic_folder
from resae_serve.importers import import_saelens
from resae_serve.importers.saelens import (
    FROM_SAELENS,
    SAELENS_CFG_FILE,
    SAELENS_WEIGHTS_FILE,
    SAELensConfig,
    load_saelens_sae,
    read_saelens_config,
)
from resae_serve.saes import SAE, SAEConfig

logger = logging.getLogger(__name__)

SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: the cfg.json layout this module writes."""
DEFAULT_HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"

TO_SAELENS: dict[str, str] = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

__all__ = [
    "DEFAULT_HOOK_TEMPLATE", "FROM_SAELENS", "SAELENS_CFG_FILE", "SAELENS_FORMAT_VERSION",
    "SAELENS_WEIGHTS_FILE", "TO_SAELENS", "SAELensConfig", "export_saelens", "folded_tensors",
    "import_saelens", "load_saelens_sae", "read_saelens_config", "saelens_cfg",
]


# ---------------------------------------------------------------------- export


def export_saelens(
    artifact_dir: Path, out_dir: Path, *, hook_template: str = DEFAULT_HOOK_TEMPLATE
) -> list[Path]:
    """Write one SAELens folder per layer, ``out_dir/layer_<L>/``, of a layerwise dictionary.

    ``hook_template`` names the hook point (``{layer}`` is replaced by the block index). Scales
    are folded into the weights (module docstring), so each SAE reads raw block outputs.
    Returns the folders written, in layer order.
    """
    try:
        hook_template.format(layer=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise ArtifactError(f"hook_template={hook_template!r} is not a format string with only "
                            f"'{{layer}}' ({exc}); e.g. {DEFAULT_HOOK_TEMPLATE!r}") from exc
    if "{layer}" not in hook_template:
        raise ArtifactError(f"hook_template={hook_template!r} lacks '{{layer}}'; e.g. "
                            f"{DEFAULT_HOOK_TEMPLATE!r}")
    resae, manifest = load_artifact(Path(artifact_dir))
    if resae.mode == "resae" and len(resae.layers) > 1:
        raise ArtifactError(
            f"{artifact_dir}: mode is 'resae' (layers {list(resae.layers)}); its SAEs after the "
            "first read h_m − A h_{m−1} − c, which SAELens cannot express. Train with "
            "--mode layerwise to export to SAELens."
        )
    folders = []
    for i, (layer, sae) in enumerate(zip(resae.layers, resae.saes, strict=True)):
        scale = float(resae.scales[i])
        folder = Path(out_dir) / f"layer_{layer}"
        with atomic_folder(folder) as tmp:
            tensors = folded_tensors(sae, scale)
            save_file(tensors, str(tmp / SAELENS_WEIGHTS_FILE))
            cfg = saelens_cfg(sae.config, tensors["W_enc"].dtype,
                              hook_template.format(layer=layer), manifest.model, layer, scale)
            (tmp / SAELENS_CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        folders.append(folder)
    logger.info("exported %d SAELens folders (layers %s) to %s", len(folders),
                list(resae.layers), out_dir)
    return folders


def folded_tensors(sae: SAE, scale: float) -> dict[str, torch.Tensor]:
    """SAELens tensors of ``sae`` with the input scale folded in (stored dtype kept, CPU)."""
    tensors = {k: v.detach().cpu().double() for k, v in sae.inference_tensors().items()}
    dtype = sae.W_enc.dtype
    tensors["W_enc"] = tensors["W_enc"] / scale
    tensors["W_dec"] = tensors["W_dec"] * scale
    tensors["b_dec"] = tensors["b_dec"] * scale
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


def saelens_cfg(config: SAEConfig, dtype: torch.dtype, hook_name: str, model: ModelIdentity,
                layer: int, scale: float) -> dict[str, Any]:
    """The SAELens 6.x ``cfg.json`` content for one exported layer."""
    if config.architecture not in TO_SAELENS:
        raise ArtifactError(f"architecture={config.architecture!r} has no SAELens inference "
                            f"form; exportable: {', '.join(TO_SAELENS)}")
    cfg: dict[str, Any] = {
        "architecture": TO_SAELENS[config.architecture],
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "dtype": _DTYPE_NAMES[dtype],
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if config.architecture == "topk":
        cfg["k"] = config.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model.name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "resae_serve": {
            "version": __version__, "model_fingerprint": model.fingerprint, "layer": layer,
            "folded_scale": scale, "sae_config": config.to_dict(),
        },
    }
    return cfg
