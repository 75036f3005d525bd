"""Pretrained dictionaries: SAEs of other libraries imported as a layerwise dictionary folder.

One module per source, each with ``find(paths) -> list[Path]`` (the SAEs the given paths hold)
and ``read(path, *, model, layer, k) -> ImportedSAE``:

    saelens     SAELens 5.x / 6.x folders (cfg.json + sae_weights.safetensors): ReLU, TopK,
                JumpReLU
    sparsify    EleutherAI sparsify folders, one per hookpoint (cfg.json + sae.safetensors): TopK
    gemmascope  Gemma Scope params.npz: JumpReLU

:func:`import_dictionary` turns several SAEs (one per layer) into one ``layerwise`` dictionary
(docs/ARCHITECTURE.md §4) for a given model, with scale 1.0 per layer and every library
option folded into the weights, so the dictionary's codes equal each library's own ``encode``
of the same block outputs. Hook names map to block outputs as
:mod:`resae_serve.importers.hooks` says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from resae_serve.artifact import ArtifactError, ModelIdentity
from resae_serve.importers import gemmascope, saelens, sparsify
from resae_serve.importers.common import ImportedSAE, model_identity, save_imported


class Source(NamedTuple):
    """How to find and read the SAEs of one library."""

    find: Callable[[list[Path]], list[Path]]
    read: Callable[..., ImportedSAE]


SOURCES: dict[str, Source] = {
    "saelens": Source(saelens.find, saelens.read),
    "sparsify": Source(sparsify.find, sparsify.read),
    "gemmascope": Source(gemmascope.find, gemmascope.read),
}


def read_saes(source: str, paths: Sequence[Path], *, model: ModelIdentity,
              layers: Sequence[int] | None = None, k: int | None = None) -> list[ImportedSAE]:
    """The SAEs ``paths`` hold, converted; ``layers`` gives one layer per SAE found (in the
    order found: paths as given, folders of SAEs in natural order)."""
    if source not in SOURCES:
        raise ArtifactError(f"source={source!r} is unknown; allowed: {', '.join(SOURCES)}")
    found = SOURCES[source].find([Path(p) for p in paths])
    if not found:
        raise ArtifactError(f"no {source} SAE given")
    if layers is not None and len(layers) != len(found):
        raise ArtifactError(
            f"layers has {len(layers)} entries for {len(found)} {source} SAEs "
            f"({', '.join(str(p) for p in found)}); give one layer per SAE or none")
    return [SOURCES[source].read(path, model=model, k=k,
                                 layer=None if layers is None else layers[i])
            for i, path in enumerate(found)]


def import_dictionary(source: str, paths: Sequence[Path], out_dir: Path, *,
                      model: ModelIdentity, layers: Sequence[int] | None = None,
                      k: int | None = None) -> Path:
    """Write the ``source`` SAEs in ``paths`` as one layerwise dictionary at ``out_dir``.

    ``model`` is the identity of the model they read (see :func:`model_identity`); every
    ``d_in`` must equal its ``d_model``. ``layers``: one per SAE, checked against what the
    source says. ``k``: codes per token kept by sparse encoding of ReLU / JumpReLU SAEs
    (default 32; TopK SAEs keep their own). Layers are sorted; two SAEs on one layer are
    refused. Nothing is written when anything is refused.
    """
    saes = read_saes(source, paths, model=model, layers=layers, k=k)
    return save_imported(saes, out_dir, model, source)


def import_saelens(sae_dirs: Sequence[Path], out_dir: Path, *, model: ModelIdentity,
                   layers: Sequence[int] | None = None, k: int | None = None) -> Path:
    """:func:`import_dictionary` of SAELens folders."""
    return import_dictionary("saelens", sae_dirs, out_dir, model=model, layers=layers, k=k)


__all__ = ["SOURCES", "ImportedSAE", "Source", "import_dictionary", "import_saelens",
           "model_identity", "read_saes"]
