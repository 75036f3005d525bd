"""Stream residual-stream activations out of a Hugging Face causal LM.

``h_l`` is the output of decoder block ``l``: Hugging Face's ``hidden_states[l + 1]`` for every
block but the last, whose ``hidden_states`` entry has the final norm applied (we keep the raw
block output there, which is what a vLLM hook on that block sees too). The forward pass stops
right after the deepest requested block, so layers beyond it and the unembedding cost nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from resae_serve.blocks import check_layers, find_decoder_blocks, num_hidden_layers
from resae_serve.errors import CaptureError
from resae_serve.windows import iter_token_windows

logger = logging.getLogger(__name__)

CaptureDtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


@dataclass(frozen=True)
class CaptureConfig:
    """How to cut the corpus into windows and which activations to keep."""

    layers: tuple[int, ...]
    """Block indices whose outputs are captured (``h_l`` = HF ``hidden_states[l + 1]``)."""
    context_size: int = 256
    """Tokens per window, BOS included."""
    batch_size: int = 8
    """Windows per forward pass."""
    dtype: CaptureDtype = "float32"
    """Storage dtype of the captured activations (the model runs in its own dtype)."""
    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token, when it has one."""
    skip_bos: bool = True
    """Drop the BOS position: its activations are outliers no feature should fit."""
    pack: bool = True
    """Concatenate documents (EOS-separated) instead of padding each one."""
    stop_early: bool = True
    """Stop the forward pass after the deepest requested block."""
    outlier_norm_ratio: float | None = 10.0
    """Drop tokens whose norm at any captured layer exceeds this multiple of the batch median
    (the massive activations of attention-sink tokens, up to ~170x the median in SmolLM2,
    would dominate every least-squares fit). None keeps every token."""
    max_tokens: int | None = None
    """Stop after this many captured tokens (None: the whole corpus)."""
    shuffle_buffer: int = 0
    """Shuffle through a buffer of this many tokens (0: keep corpus order)."""
    seed: int = 0
    """Seed of the shuffle."""
    progress: bool = True
    """Show a progress bar with tokens/s."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CaptureError(f"dtype={self.dtype!r}; allowed: {sorted(DTYPES)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise CaptureError(f"max_tokens={self.max_tokens}; must be positive or None")
        if self.outlier_norm_ratio is not None and self.outlier_norm_ratio <= 1:
            raise CaptureError(f"outlier_norm_ratio={self.outlier_norm_ratio}; must be > 1 or None")
        if self.shuffle_buffer < 0:
            raise CaptureError(f"shuffle_buffer={self.shuffle_buffer}; must be >= 0")


class ActivationBatch(NamedTuple):
    """Captured activations of N tokens at every requested layer, plus where they came from."""

    acts: torch.Tensor
    """(N, n_layers, d_model) activations, layers in ascending order."""
    token_ids: torch.Tensor
    """(N,) int64 token id at each captured position."""
    window: torch.Tensor
    """(N,) int64 index of the token window in the stream."""
    position: torch.Tensor
    """(N,) int64 position inside the window."""


class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the hook of the deepest requested block to end the forward pass."""


class LayerCapture:
    """Context manager that hooks decoder blocks and returns their outputs for one forward.

    >>> with LayerCapture(model, (3, 6)) as cap:
    ...     acts = cap.run(input_ids, attention_mask)   # {3: (B, T, d), 6: (B, T, d)}
    """

    def __init__(self, model: nn.Module, layers: Iterable[int], *, stop_early: bool = True):
        self.model = model
        self.layers = check_layers(tuple(layers), num_hidden_layers(model))
        self.stop_early = stop_early
        _, self.blocks = find_decoder_blocks(model)
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: int) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        last = layer == self.layers[-1]

        def hook(_module: nn.Module, _args: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if not isinstance(hidden, torch.Tensor):
                raise CaptureError(f"block {layer} returned {type(hidden).__name__}, not a tensor")
            self._outputs[layer] = hidden.detach()
            if last and self.stop_early:
                raise _StopForward

        return hook

    def __enter__(self) -> LayerCapture:
        self._handles = [
            self.blocks[layer].register_forward_hook(self._hook(layer)) for layer in self.layers
        ]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """One forward pass of the base model; block outputs ``{layer: (B, T, d)}``."""
        if not self._handles:
            raise CaptureError("LayerCapture.run called outside its `with` block")
        self._outputs = {}
        base = getattr(self.model, "base_model", self.model)  # no unembedding needed
        with contextlib.suppress(_StopForward):
            base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        outputs, self._outputs = self._outputs, {}
        return outputs


def capture_activations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[str],
    config: CaptureConfig,
) -> Iterator[ActivationBatch]:
    """Yield activations at ``config.layers`` over the documents, in order or shuffled."""
    stream = _capture_in_order(model, tokenizer, documents, config)
    if config.shuffle_buffer:
        from resae_serve.shuffle import shuffled

        stream = shuffled(stream, config.shuffle_buffer, seed=config.seed)
    return stream


def _capture_in_order(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[str],
    config: CaptureConfig,
) -> Iterator[ActivationBatch]:
    device = next(model.parameters()).device
    dtype = DTYPES[config.dtype]
    remaining = config.max_tokens
    n_captured = 0
    windows = iter_token_windows(
        documents, tokenizer, context_size=config.context_size, batch_size=config.batch_size,
        prepend_bos=config.prepend_bos, skip_bos=config.skip_bos, pack=config.pack,
    )
    bar = tqdm(total=config.max_tokens, unit="tok", unit_scale=True, desc="capture",
               disable=not config.progress, dynamic_ncols=True)
    with bar, torch.inference_mode(), LayerCapture(
        model, config.layers, stop_early=config.stop_early
    ) as cap:
        for win in windows:
            outputs = cap.run(win.input_ids.to(device), win.attention_mask.to(device))
            keep = win.keep.to(device)
            acts = torch.stack([outputs[layer][keep] for layer in cap.layers], dim=1).to(dtype)
            rows, cols = win.keep.nonzero(as_tuple=True)
            batch = ActivationBatch(acts, win.input_ids[rows, cols], win.window_index[rows], cols)
            if config.outlier_norm_ratio is not None and len(acts):
                batch = _drop_outliers(batch, config.outlier_norm_ratio)
            if remaining is not None and len(batch.acts) >= remaining:
                batch = ActivationBatch(*(t[:remaining] for t in batch))
            n_captured += len(batch.acts)
            bar.update(len(batch.acts))
            if len(batch.acts):
                yield batch
            if remaining is not None:
                remaining -= len(batch.acts)
                if remaining <= 0:
                    break
    if n_captured == 0:
        raise CaptureError(
            "captured no tokens: the corpus is empty or every position was skipped "
            "(check the corpus, or pass --no-skip-bos with a longer --context-size)"
        )


def _drop_outliers(batch: ActivationBatch, ratio: float) -> ActivationBatch:
    """Remove tokens whose norm at any layer exceeds ``ratio`` times that layer's median."""
    norms = batch.acts.float().norm(dim=-1)                       # (N, L)
    keep = (norms <= ratio * norms.median(dim=0).values).all(dim=1)
    if bool(keep.all()):
        return batch
    logger.debug("dropped %d outlier tokens of %d", int((~keep).sum()), len(keep))
    return ActivationBatch(*(t[keep.to(t.device)] for t in batch))
