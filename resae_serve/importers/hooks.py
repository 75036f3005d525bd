"""Hook names of other SAE libraries mapped to our hook point, the output of block ``L``.

Our dictionaries read the residual stream after decoder block ``L`` (Hugging Face
``hidden_states[L + 1]``). Accepted spellings of that point:

    blocks.L.hook_resid_post    TransformerLens (SAELens, Gemma Scope)
    blocks.L.hook_resid_pre     the input of block L = the output of block L − 1 (L ≥ 1)
    layers.L, model.layers.L    a Hugging Face decoder layer (sparsify hookpoints, nnsight)
    h.L, transformer.h.L        the same for GPT-2 style models
    gpt_neox.layers.L           the same for GPT-NeoX

Everything else (attention or MLP outputs, ``hook_z``, ``hook_resid_mid``, the embeddings, a
sub-module of a layer) is refused with the name and this list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from resae_serve.artifact import ArtifactError

ALLOWED_HOOKS = ("blocks.<L>.hook_resid_post", "blocks.<L>.hook_resid_pre (L >= 1)", "layers.<L>",
                 "model.layers.<L>", "h.<L>", "transformer.h.<L>", "gpt_neox.layers.<L>")
"""What :func:`parse_hook` accepts."""
ALLOWED = ", ".join(ALLOWED_HOOKS)
"""The same, for error messages."""

_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")
_BLOCK = re.compile(r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)")


@dataclass(frozen=True)
class BlockHook:
    """A hook name that reads a block output."""

    name: str
    """The hook name as the source wrote it."""
    index: int
    """The layer number written in the name (``L`` of ``blocks.L.hook_resid_pre``)."""
    layer: int
    """The block whose output it reads (``index − 1`` for ``hook_resid_pre``)."""


def parse_hook(name: str, where: str) -> BlockHook:
    """The block output ``name`` reads; ``ArtifactError`` naming ``where`` for anything else."""
    if match := _RESID_PRE.fullmatch(name):
        index = int(match.group(1))
        if index == 0:
            raise ArtifactError(
                f"{where}: hook_name={name!r} reads the embeddings (the input of block 0), "
                f"which is no block output; allowed: {ALLOWED}")
        return BlockHook(name, index, index - 1)
    for pattern in (_RESID_POST, _BLOCK):
        if match := pattern.fullmatch(name):
            index = int(match.group(1))
            return BlockHook(name, index, index)
    raise ArtifactError(f"{where}: hook point {name!r} is not a residual-stream block output "
                        f"(attention and MLP outputs, hook_z, resid_mid and embeddings cannot be "
                        f"served); allowed: {ALLOWED}")
