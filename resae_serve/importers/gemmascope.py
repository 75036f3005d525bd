"""Import Gemma Scope JumpReLU SAEs: one ``params.npz`` each (Google DeepMind, 2024).

Format: a NumPy ``.npz`` with ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` and ``threshold [d_sae]`` (float32), as in the ``google/gemma-scope-*``
releases and SAELens' ``gemma_2_sae_huggingface_loader`` (``sae_lens/loading/
pretrained_sae_loaders.py``, which also accepts lower-case ``w_enc`` / ``w_dec`` and an optional
``scaling_factor``). Encoding, from the Gemma Scope tutorial and SAELens' config for these files
(``apply_b_dec_to_input: false``)::

    pre = x W_enc + b_enc        z = relu(pre) · (pre > threshold)

so import folds ``b_enc += b_dec W_enc`` (ours subtracts ``b_dec`` first); a ``scaling_factor``
other than all ones (it scales codes before ``W_dec``) is folded into ``W_dec``.

The file does not say where it reads. The layer comes from the conventional path
``…/layer_<L>/width_16k/average_l0_71/params.npz`` or from ``layers`` (both: they must agree),
and the hook point is taken to be the residual stream after block L (the ``-res`` releases,
SAELens ``blocks.L.hook_resid_post``). A path through a ``-mlp``, ``-att`` or ``-transcoders``
release folder, or an ``embedding`` SAE, is refused.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from resae_serve.artifact import ArtifactError, ModelIdentity
from resae_serve.importers.common import (
    ImportedSAE,
    build_sae,
    check_shapes,
    fold_input_bias,
    resolve_layer,
    sae_config,
)
from resae_serve.importers.hooks import ALLOWED

PARAMS_FILE = "params.npz"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
_LAYER_DIR = re.compile(r"layer_(\d+)")
_OTHER_RELEASE = re.compile(r"gemma-scope-.*-(mlp|att|transcoders?)(-canonical)?")


def find(paths: list[Path]) -> list[Path]:
    """The ``params.npz`` files among ``paths`` (a file, or a folder holding one)."""
    found = []
    for path in map(Path, paths):
        file = path / PARAMS_FILE if path.is_dir() else path
        if not file.is_file():
            raise ArtifactError(f"{file} is missing: give a Gemma Scope params.npz or the "
                                f"folder holding it (e.g. layer_5/width_16k/average_l0_71)")
        found.append(file)
    return found


def layer_from_path(path: Path) -> int | None:
    """The ``L`` of the innermost ``layer_<L>`` folder on ``path``; refuses non-residual
    releases and embedding SAEs."""
    for part in Path(path).parts:
        if _OTHER_RELEASE.fullmatch(part) or part == "embedding":
            raise ArtifactError(f"{path}: folder {part!r} holds Gemma Scope SAEs of another "
                                f"hook point than a block output; allowed: {ALLOWED} (the "
                                "-res releases)")
    layers = [int(m.group(1)) for part in Path(path).parts if (m := _LAYER_DIR.fullmatch(part))]
    return layers[-1] if layers else None


def read(path: Path, *, model: ModelIdentity, layer: int | None = None,
         k: int | None = None) -> ImportedSAE:
    """The Gemma Scope SAE in ``path`` (a ``params.npz``), at its path's or the given layer.

    ``k`` sets the codes per token :meth:`SAE.encode_sparse` keeps (default 32).
    """
    path = Path(path)
    chosen = resolve_layer(path, {"path": layer_from_path(path), "layers": layer}, model)
    tensors = _load(path)
    scaling = tensors.pop("scaling_factor", None)
    extra = sorted(set(tensors) - set(TENSORS))
    if extra:
        raise ArtifactError(f"{path}: unexpected arrays {extra}; a Gemma Scope JumpReLU SAE "
                            f"has {', '.join(TENSORS)} (and optionally scaling_factor)")
    if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
        raise ArtifactError(f"{path}: array 'W_enc' is missing or not 2-D; expected "
                            "[d_in, d_sae]")
    d_in, d_sae = tensors["W_enc"].shape
    config = sae_config(path, "jumprelu", d_in, d_sae, k)
    check_shapes(path, tensors, config)
    dtype = tensors["W_enc"].dtype
    folded = {name: t.double() for name, t in tensors.items()}
    if scaling is not None:
        if tuple(scaling.shape) != (d_sae,):
            raise ArtifactError(f"{path}: array 'scaling_factor' has shape "
                                f"{list(scaling.shape)}; expected [{d_sae}]")
        folded["W_dec"] = folded["W_dec"] * scaling.double()[:, None]
    sae = build_sae(path, config, fold_input_bias(folded), dtype)
    return ImportedSAE(chosen, sae, path, f"blocks.{chosen}.hook_resid_post")


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"cannot read {path} as a NumPy .npz file: {exc}") from exc
    out = {}
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            raise ArtifactError(f"{path}: array {name!r} has dtype {array.dtype}; expected "
                                "floating point")
        key = "W_" + name[2:] if name.startswith("w_") else name  # as SAELens' loader
        out[key] = torch.from_numpy(array.copy())
    return out
