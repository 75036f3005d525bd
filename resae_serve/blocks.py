"""Find the decoder blocks of any Hugging Face causal LM without per-family tables.

The blocks are the outermost ``nn.ModuleList`` whose length is the model's number of hidden
layers and whose entries all share one class: ``model.layers`` (Llama, Qwen2, Mistral),
``transformer.h`` (GPT-2), ``gpt_neox.layers`` (GPT-NeoX, Pythia), and so on.
"""

from __future__ import annotations

from torch import nn

from resae_serve.errors import CaptureError


def num_hidden_layers(model: nn.Module) -> int:
    """Number of decoder blocks declared by the model's (text) config."""
    config = getattr(model, "config", None)
    if config is None:
        raise CaptureError(f"{type(model).__name__} has no .config; pass a Hugging Face model")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise CaptureError(f"config of {type(model).__name__} declares no num_hidden_layers")
    return n


def block_list(model: nn.Module, n: int) -> tuple[str, nn.ModuleList] | None:
    """The outermost ``ModuleList`` of ``n`` blocks of one class in ``model`` and its qualified
    name (``None`` if there is none); also finds the blocks of vLLM's model classes."""
    for name, module in model.named_modules():  # pre-order: outermost first
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == n
            and len({type(block) for block in module}) == 1
        ):
            return name, module
    return None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the qualified name and the ``ModuleList`` of the model's decoder blocks."""
    n = num_hidden_layers(model)
    found = block_list(model, n)
    if found is not None:
        return found
    raise CaptureError(
        f"found no ModuleList of {n} identical blocks in {type(model).__name__}; "
        "this architecture is not supported for capture"
    )


def check_layers(layers: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    """Validate layer indices against the model depth; return them sorted and unique."""
    if not layers:
        raise CaptureError("layers is empty; give at least one block index, e.g. --layers 6,12")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise CaptureError(
            f"layers {bad} out of range: this model has {n_layers} blocks, "
            f"allowed indices are 0..{n_layers - 1}"
        )
    return tuple(sorted(set(layers)))
