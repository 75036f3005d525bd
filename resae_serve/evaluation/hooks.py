"""Forward hooks on decoder blocks that read or replace a block's output for one forward pass.

Splicing, ablation and the linear-propagation check all need the same thing: run the model
once while some blocks' outputs are recorded or swapped. A hook here is a ``BlockFn`` that
takes the block's hidden output ``(B, T, d)`` and returns a replacement (or ``None`` to keep
it); blocks that return tuples keep their other outputs. Hooks run in block order, so a hook
may read what an earlier hook stored in the same pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from resae_serve.blocks import find_decoder_blocks
from resae_serve.errors import CaptureError

BlockFn = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Called with a block's hidden output ``(B, T, d)``; returns a replacement or ``None``."""


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Ends the forward pass after the last block a caller needs."""


def _wrap(layer: int, fn: BlockFn, stop: bool) -> Callable[[nn.Module, object, object], object]:
    def hook(_module: nn.Module, _args: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor):
            raise CaptureError(f"block {layer} returned {type(hidden).__name__}, not a tensor")
        new = fn(hidden)
        if stop:
            raise _StopForward
        if new is None:
            return None
        if new.shape != hidden.shape:
            raise CaptureError(f"hook at block {layer} returned shape {tuple(new.shape)}; "
                               f"the block output has {tuple(hidden.shape)}")
        new = new.to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


@contextlib.contextmanager
def hooked(model: nn.Module, fns: Mapping[int, BlockFn], *, stop_after: int | None = None,
           ) -> Iterator[None]:
    """Register ``fns`` on the model's decoder blocks for the ``with`` body."""
    _, blocks = find_decoder_blocks(model)
    for layer in [*fns, *([] if stop_after is None else [stop_after])]:
        if not 0 <= layer < len(blocks):
            raise CaptureError(f"layer={layer}; this model has blocks 0..{len(blocks) - 1}")
    all_fns = dict(fns)
    if stop_after is not None:
        all_fns.setdefault(stop_after, lambda _hidden: None)
    handles = [blocks[layer].register_forward_hook(_wrap(layer, fn, layer == stop_after))
               for layer, fn in all_fns.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   fns: Mapping[int, BlockFn] | None = None) -> torch.Tensor:
    """Logits ``(B, T, V)`` of one forward pass with ``fns`` hooked on their blocks."""
    with hooked(model, fns or {}):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits


@torch.no_grad()
def forward_until(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  fns: Mapping[int, BlockFn], stop_after: int) -> None:
    """Run the base model with ``fns`` hooked and stop after block ``stop_after`` (no logits)."""
    base = getattr(model, "base_model", model)
    with hooked(model, fns, stop_after=stop_after), contextlib.suppress(_StopForward):
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def recorder(store: dict[int, torch.Tensor], layer: int) -> BlockFn:
    """A hook that keeps the block output in ``store[layer]`` and changes nothing."""
    def fn(hidden: torch.Tensor) -> None:
        store[layer] = hidden.detach()
    return fn


def replace_at(hidden: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``hidden (B, T, d)`` with the positions in ``keep (B, T)`` set to ``rows (N, d)``."""
    out = hidden.clone()
    out[keep] = rows.to(hidden.dtype)
    return out


def constant_at(keep: torch.Tensor, rows: torch.Tensor) -> BlockFn:
    """A hook that writes fixed ``rows (N, d)`` (or one row ``(d,)``) at the kept positions."""
    def fn(hidden: torch.Tensor) -> torch.Tensor:
        return replace_at(hidden, keep, rows.expand(int(keep.sum()), hidden.shape[-1]))
    return fn


def added_at(keep: torch.Tensor, rows: torch.Tensor) -> BlockFn:
    """A hook that adds fixed ``rows (N, d)`` to the block output at the kept positions."""
    def fn(hidden: torch.Tensor) -> torch.Tensor:
        return replace_at(hidden, keep, hidden[keep].float() + rows)
    return fn
