"""Import EleutherAI sparsify SAEs: one folder per hookpoint, ``cfg.json`` + ``sae.safetensors``.

Format followed: ``SparseCoder.save_to_disk`` / ``load_from_disk`` in ``sparsify/sparse_coder.py``
and ``SparseCoderConfig`` in ``sparsify/config.py`` (repository EleutherAI/sparsify, PyPI
``eai-sparsify`` 1.3). ``cfg.json`` holds the config fields plus ``d_in``; the tensors are
``encoder.weight [d_sae, d_in]``, ``encoder.bias [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` and, with a skip connection, ``W_skip [d_in, d_in]``. ``d_sae`` is
``num_latents``, or ``d_in · expansion_factor`` when that is 0.

Encoding (``SparseCoder.encode`` → ``fused_encoder``): ``pre = relu((x − b_dec) Wᵀ + b)``, then
the ``k`` largest per token; ours computes ``TopK_k(pre)`` then ReLU, which yields the same
nonzero codes. So ``W_enc = encoder.weightᵀ``, ``b_enc = encoder.bias``, the rest unchanged.

The trainer names each folder after its hookpoint, a module path under the model's base model
(``layers.5`` for Llama or GPT-NeoX, ``h.5`` for GPT-2): the layer comes from that name (see
:mod:`resae_serve.importers.hooks`; ``layers``, if given, must agree), so a renamed folder is
refused rather than guessed. A folder
``<hookpoint>/seed<N>`` (several seeds) takes the hookpoint from its parent. Refused, naming the
file: ``activation: groupmax``, ``skip_connection`` (the skip term is not part of a dictionary),
``transcode`` (a transcoder predicts a module's output from its input), old ``signed`` codes,
hookpoints other than block outputs (``layers.5.mlp``, ``embed_tokens``, …).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from resae_serve.artifact import ArtifactError, ModelIdentity, read_json_object
from resae_serve.importers.common import (
    ImportedSAE,
    build_sae,
    expand_folders,
    require_shapes,
    resolve_layer,
    sae_config,
)
from resae_serve.importers.hooks import parse_hook

SPARSIFY_CFG_FILE = "cfg.json"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"


def find(paths: list[Path]) -> list[Path]:
    """Sparsify SAE folders among ``paths`` (a checkpoint folder expands to its hookpoints)."""
    return expand_folders(paths, SPARSIFY_CFG_FILE, "sparsify SAE")


def hookpoint(folder: Path) -> str:
    """The hookpoint a sparsify folder was saved under (its name; its parent's for seeds)."""
    folder = Path(folder).resolve()
    return folder.parent.name if re.fullmatch(r"seed\d+", folder.name) else folder.name


def read(folder: Path, *, model: ModelIdentity, layer: int | None = None,
         k: int | None = None) -> ImportedSAE:
    """The sparsify SAE in ``folder``; ``layer`` (optional) must agree with its hookpoint.

    ``k`` is ignored: a sparsify SAE is TopK with its own ``k``.
    """
    path = Path(folder) / SPARSIFY_CFG_FILE
    raw = read_json_object(path, f"{folder} is not a sparsify SAE folder")
    name = hookpoint(folder)
    from_name = parse_hook(name, f"{path} (hookpoint = folder name)").layer
    chosen = resolve_layer(path, {"hookpoint": from_name, "layers": layer}, model)
    d_in, d_sae, top_k = _check_config(raw, path)
    config = sae_config(path, "topk", d_in, d_sae, top_k)
    weights = Path(folder) / SPARSIFY_WEIGHTS_FILE
    tensors = _load(weights)
    if "W_skip" in tensors:
        raise ArtifactError(f"{weights}: tensor 'W_skip' (a skip connection) cannot be part of "
                            "a dictionary; allowed: encoder.weight, encoder.bias, W_dec, b_dec")
    require_shapes(weights, tensors, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                                      "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
                   f"d_in={d_in}, d_sae={d_sae}")
    ours = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
            "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    return ImportedSAE(chosen, build_sae(weights, config, ours, ours["W_enc"].dtype), path,
                       name)


def _check_config(raw: dict[str, Any], path: Path) -> tuple[int, int, int]:
    """``d_in``, ``d_sae`` and ``k`` of a sparsify ``cfg.json``, refusing what is not a TopK SAE."""
    for key, allowed in (("activation", "topk"), ("skip_connection", False),
                         ("transcode", False), ("signed", False)):
        value = raw.get(key, allowed)
        if value != allowed:
            what = {"activation": "only TopK SAEs can be imported",
                    "skip_connection": "the skip term W_skip is not part of a dictionary",
                    "transcode": "a transcoder predicts a module's output from its input, not "
                                 "a block output from itself",
                    "signed": "signed codes are not ReLU codes"}[key]
            raise ArtifactError(f"{path}: field {key!r} is {value!r} ({what}); allowed: "
                                f"{allowed!r}")
    d_in = _int(raw, "d_in", path, minimum=1)
    k = _int(raw, "k", path, minimum=1)
    num_latents = _int(raw, "num_latents", path, minimum=0, default=0)
    d_sae = num_latents or d_in * _int(raw, "expansion_factor", path, minimum=1, default=32)
    return d_in, d_sae, k


def _int(raw: dict[str, Any], key: str, path: Path, *, minimum: int,
         default: int | None = None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ArtifactError(f"{path}: field {key!r} is {value!r}; expected an integer >= "
                            f"{minimum}")
    return value


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {path.parent} is not a complete sparsify SAE "
                            "folder")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc

