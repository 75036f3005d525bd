"""Per-layer export to and import from SAELens' on-disk SAE format (DESIGN.md §4).

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

Import also reads the flat 5.x layout: ``hook_name`` (or ``hook_point``) and ``hook_layer`` at
the top level, ``activation_fn_str`` (or ``activation_fn``) with ``activation_fn_kwargs {"k": …}``,
architecture ``"standard"`` + activation ``"topk"`` meaning a TopK SAE, and a boolean
``normalize_activations``.

Architectures: ours ``topk`` ↔ SAELens ``topk`` (``k``); ``jumprelu`` ↔ ``jumprelu``
(``threshold``; SAELens compares ``pre > relu(threshold)``, the same codes as our
``relu(pre) * (pre > threshold)``); ``relu`` ↔ ``standard``. A BatchTopK layer is already saved
as JumpReLU by :func:`~resae_serve.artifact.save_artifact`.

Scales. Our SAEs read ``h / s`` and reconstruct ``s · (z W_dec + b_dec)``; SAELens SAEs read raw
``h``. Export folds ``s`` in exactly: ``W_enc' = W_enc / s``, ``b_enc' = b_enc``,
``W_dec' = s·W_dec``, ``b_dec' = s·b_dec``, ``threshold' = threshold`` (the pre-activations are
unchanged: ``(h − s b_dec) W_enc / s + b_enc = (h/s − b_dec) W_enc + b_enc``). Import keeps the
weights and uses scale 1.0 for every layer, so decoder rows need not be unit norm afterwards.
Import also folds the SAELens options that have an exact equivalent:
``apply_b_dec_to_input: false`` (``b_enc += b_dec W_enc``) and TopK's
``rescale_acts_by_decoder_norm`` (decoder norms moved into the encoder).

Only ``layerwise`` dictionaries export (and one-layer ``resae`` ones, which are the same thing):
a residualized layer reads ``h_m − A h_{m−1} − c``, which a single SAELens SAE on one hook point
cannot express.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from resae_serve import __version__
from resae_serve.artifact import (
    ArtifactError,
    ModelIdentity,
    load_artifact,
    read_json_object,
    save_artifact,
)
from resae_serve.cache import atomic_folder
from resae_serve.resae import ReSAE
from resae_serve.saes import SAE, Architecture, SAEConfig, sae_class, sae_from_tensors

logger = logging.getLogger(__name__)

SAELENS_CFG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: the cfg.json layout this module writes."""
DEFAULT_HOOK_TEMPLATE = "blocks.{layer}.hook_resid_post"

TO_SAELENS: dict[str, str] = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}
FROM_SAELENS: dict[str, Architecture] = {"topk": "topk", "jumprelu": "jumprelu",
                                         "standard": "relu"}
RESID_POST_HOOKS = (
    re.compile(r"blocks\.(\d+)\.hook_resid_post"),  # TransformerLens name
    re.compile(r"model\.layers\.(\d+)"),  # output of a Hugging Face decoder layer
)
"""Hook names that mean "output of block L", our hook point."""

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SPARSE_K = 32
"""Codes per token :meth:`SAE.encode_sparse` keeps for imported ReLU / JumpReLU layers (our
``SAEConfig`` default), unless a resae-serve export recorded the original value."""


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
    """5.x ``hook_layer`` when present."""
    apply_b_dec_to_input: bool
    rescale_acts_by_decoder_norm: bool
    resae_config: dict[str, Any] | None
    """Our ``SAEConfig`` as recorded by :func:`export_saelens`, if this folder came from us."""


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


# ---------------------------------------------------------------------- import


def import_saelens(
    sae_dirs: Sequence[Path], out_dir: Path, *, model: ModelIdentity,
    layers: Sequence[int] | None = None,
) -> Path:
    """Build a layerwise dictionary folder at ``out_dir`` from SAELens folders.

    Each folder's layer comes from its hook name (``blocks.<L>.hook_resid_post``) or 5.x
    ``hook_layer``, or from ``layers`` (one per folder; must agree with a hook name present).
    Refused, with the file named: other hook points, ``d_in`` ≠ ``model.d_model``, unknown
    architectures, ``normalize_activations`` other than ``"none"``, missing or bad files.
    Every layer gets scale 1.0.
    """
    dirs = [Path(d) for d in sae_dirs]
    if not dirs:
        raise ArtifactError("import_saelens needs at least one SAELens folder")
    if layers is not None and len(layers) != len(dirs):
        raise ArtifactError(f"layers has {len(layers)} entries for {len(dirs)} SAELens folders; "
                            "give one layer per folder or none")
    by_layer: dict[int, SAE] = {}
    sources: dict[int, Path] = {}
    for i, folder in enumerate(dirs):
        spec = read_saelens_config(folder)
        layer = _layer_of(spec, None if layers is None else layers[i], model)
        if spec.d_in != model.d_model:
            raise ArtifactError(f"{spec.path}: d_in={spec.d_in}, but model {model.name!r} has "
                                f"d_model={model.d_model}")
        if layer in by_layer:
            raise ArtifactError(f"{spec.path}: layer {layer} already comes from {sources[layer]}; "
                                "give one SAE per layer")
        by_layer[layer] = load_saelens_sae(folder, spec)
        sources[layer] = folder
    order = sorted(by_layer)
    resae = ReSAE(order, [by_layer[layer] for layer in order], [1.0] * len(order),
                  mode="layerwise")
    training = {"imported_from": "saelens",
                "sources": {str(layer): str(sources[layer]) for layer in order}}
    save_artifact(resae, Path(out_dir), model, training=training)
    logger.info("imported %d SAELens SAEs (layers %s) into %s", len(order), order, out_dir)
    return Path(out_dir)


def read_saelens_config(folder: Path) -> SAELensConfig:
    """Parse and check ``folder/cfg.json`` (6.x nested metadata or 5.x flat layout)."""
    path = Path(folder) / SAELENS_CFG_FILE
    raw = read_json_object(path, f"{folder} is not a SAELens SAE folder")
    metadata: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    merged = {**raw, **metadata}  # 5.x keeps metadata at the top level
    normalize = merged.get("normalize_activations", "none")
    if normalize in (None, False):
        normalize = "none"
    if normalize != "none":
        raise ArtifactError(
            f"{path}: normalize_activations={normalize!r}; only 'none' can be imported (fold "
            "the normalisation into the weights first, e.g. SAELens "
            "fold_activation_norm_scaling_factor)")
    reshape = merged.get("reshape_activations", "none")
    if reshape not in (None, "none"):
        raise ArtifactError(f"{path}: reshape_activations={reshape!r}; allowed: 'none'")
    architecture, k = _architecture(raw, path)
    d_in, d_sae = _positive_int(raw, "d_in", path), _positive_int(raw, "d_sae", path)
    hook_layer = merged.get("hook_layer", merged.get("hook_point_layer"))
    ours = metadata.get("resae_serve")
    recorded = ours.get("sae_config") if isinstance(ours, dict) else None
    return SAELensConfig(
        path=path, architecture=architecture, d_in=d_in, d_sae=d_sae, k=k,
        hook_name=merged.get("hook_name", merged.get("hook_point")),
        hook_layer=hook_layer if isinstance(hook_layer, int) else None,
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


def _layer_of(spec: SAELensConfig, given: int | None, model: ModelIdentity) -> int:
    """The block index from the hook name (checked against ``given`` and 5.x ``hook_layer``)."""
    from_hook = None
    if spec.hook_name is not None:
        match = next((m for p in RESID_POST_HOOKS if (m := p.fullmatch(str(spec.hook_name)))),
                     None)
        if match is None:
            raise ArtifactError(
                f"{spec.path}: hook_name={spec.hook_name!r} is not a residual-stream block "
                "output; allowed: 'blocks.<L>.hook_resid_post' (or 'model.layers.<L>')")
        from_hook = int(match.group(1))
    candidates = {name: value for name, value in
                  (("hook_name", from_hook), ("hook_layer", spec.hook_layer), ("layers", given))
                  if value is not None}
    if not candidates:
        raise ArtifactError(f"{spec.path}: no hook_name or hook_layer says which layer this SAE "
                            "reads; pass layers=[…] (one per folder)")
    if len(set(candidates.values())) > 1:
        raise ArtifactError(f"{spec.path}: the layer is ambiguous: {candidates}")
    layer = next(iter(candidates.values()))
    if not 0 <= layer < model.n_layers:
        raise ArtifactError(f"{spec.path}: layer {layer} is outside model {model.name!r} "
                            f"(blocks 0..{model.n_layers - 1})")
    return layer


def load_saelens_sae(folder: Path, spec: SAELensConfig) -> SAE:
    """Our SAE holding the weights of ``folder/sae_weights.safetensors`` (options folded)."""
    path = Path(folder) / SAELENS_WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {folder} is not a complete SAELens SAE folder")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    config = _sae_config(spec)
    _check_shapes(path, tensors, config)
    dtype = tensors["W_enc"].dtype
    dtype = dtype if dtype in _DTYPE_NAMES else torch.float32  # e.g. float64 -> float32
    try:
        tensors = _fold_options(tensors, spec)
        return sae_from_tensors(config, {k: v.to(dtype) for k, v in tensors.items()})
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc


def _check_shapes(path: Path, tensors: dict[str, torch.Tensor], config: SAEConfig) -> None:
    expected = sae_class(config.architecture).tensor_shapes(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise ArtifactError(f"{path}: tensor {name!r} is missing; a SAELens "
                                f"{TO_SAELENS[config.architecture]} SAE has {list(expected)}")
        if tuple(tensors[name].shape) != shape:
            raise ArtifactError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}; "
                                f"expected {list(shape)} (d_in={config.d_in}, "
                                f"d_sae={config.d_sae})")


def _fold_options(tensors: dict[str, torch.Tensor], spec: SAELensConfig
                  ) -> dict[str, torch.Tensor]:
    """Fold SAELens-only options into plain weights (float64 arithmetic)."""
    out = {k: v.double() for k, v in tensors.items()}
    for name in ("finetuning_scaling_factor", "scaling_factor"):  # 5.x: scales z before W_dec
        if name in out:
            out["W_dec"] = out["W_dec"] * out.pop(name)[:, None]
    if spec.rescale_acts_by_decoder_norm:  # topk(pre·n), decode (z/n) W_dec
        norms = out["W_dec"].norm(dim=1)  # (d_sae,)
        out["W_enc"] = out["W_enc"] * norms
        out["b_enc"] = out["b_enc"] * norms
        out["W_dec"] = out["W_dec"] / norms.clamp_min(1e-12)[:, None]
    if not spec.apply_b_dec_to_input:  # pre = h W_enc + b_enc = (h − b_dec) W_enc + b_enc'
        out["b_enc"] = out["b_enc"] + out["b_dec"] @ out["W_enc"]
    return out


def _sae_config(spec: SAELensConfig) -> SAEConfig:
    """Our config: the recorded resae-serve one when consistent, else defaults."""
    k = spec.k if spec.k is not None else min(_SPARSE_K, spec.d_sae)
    try:
        base = SAEConfig(architecture=spec.architecture, d_in=spec.d_in, d_sae=spec.d_sae, k=k)
    except ValueError as exc:
        raise ArtifactError(f"{spec.path}: {exc}") from exc
    if spec.resae_config is None:
        return base
    try:
        recorded = SAEConfig.from_dict(spec.resae_config)
    except (TypeError, ValueError) as exc:
        logger.warning("%s: ignoring metadata.resae_serve.sae_config (%s)", spec.path, exc)
        return base
    if (recorded.architecture, recorded.d_in, recorded.d_sae) != (
        spec.architecture, spec.d_in, spec.d_sae
    ):
        logger.warning("%s: metadata.resae_serve.sae_config does not match the SAELens fields; "
                       "ignoring it", spec.path)
        return base
    return dataclasses.replace(recorded, k=spec.k if spec.k is not None else recorded.k)
