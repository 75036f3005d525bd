"""Cut a stream of documents into fixed-length token windows for batched forward passes.

Packed mode (the default, as in SAELens and sparsify) concatenates documents separated by the
EOS token and cuts the stream into windows, each starting with BOS when the tokenizer has one.
Unpacked mode gives every document its own windows and right-pads the last one. Each window
carries a ``keep`` mask: the positions whose activations are worth capturing (not padding and,
by default, not the BOS position, whose activations are outliers that no feature should fit).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from resae_serve.errors import CaptureError


class TokenWindows(NamedTuple):
    """A batch of token windows."""

    input_ids: torch.Tensor
    """(B, T) int64 token ids; padding positions hold the pad id."""
    attention_mask: torch.Tensor
    """(B, T) int64, 1 for real tokens, 0 for right padding."""
    keep: torch.Tensor
    """(B, T) bool, positions whose activations are captured."""
    window_index: torch.Tensor
    """(B,) int64 running index of each window in the stream."""


def _token_stream(
    documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, group: int = 64
) -> Iterator[list[int]]:
    """Token ids of each document, tokenised in groups (the fast tokenizer parallelises)."""
    docs = iter(documents)
    while chunk := list(islice(docs, group)):
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def iter_token_windows(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    context_size: int,
    batch_size: int,
    prepend_bos: bool = True,
    skip_bos: bool = True,
    pack: bool = True,
) -> Iterator[TokenWindows]:
    """Yield batches of ``batch_size`` windows of ``context_size`` tokens (last may be short)."""
    if context_size < 2:
        raise CaptureError(f"context_size={context_size}; must be at least 2")
    if batch_size < 1:
        raise CaptureError(f"batch_size={batch_size}; must be at least 1")
    bos = tokenizer.bos_token_id if prepend_bos else None
    eos = tokenizer.eos_token_id
    pad = next((t for t in (tokenizer.pad_token_id, eos, 0) if t is not None), 0)
    body = context_size - (bos is not None)
    rows: list[list[int]] = []
    n_windows = 0

    def windows() -> Iterator[list[int]]:
        buffer: list[int] = []
        for ids in _token_stream(documents, tokenizer):
            if not ids:
                continue
            if pack:
                buffer.extend(ids + ([eos] if eos is not None else []))
                while len(buffer) >= body:
                    yield buffer[:body]
                    del buffer[:body]
            else:
                for start in range(0, len(ids), body):
                    yield ids[start:start + body]
        if pack and buffer:
            yield buffer

    for row in windows():
        rows.append(row)
        if len(rows) == batch_size:
            yield _collate(rows, bos, pad, context_size, skip_bos, n_windows)
            n_windows += len(rows)
            rows = []
    if rows:
        yield _collate(rows, bos, pad, context_size, skip_bos, n_windows)


def _collate(
    rows: list[list[int]], bos: int | None, pad: int, context_size: int, skip_bos: bool,
    first_index: int,
) -> TokenWindows:
    input_ids = torch.full((len(rows), context_size), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), context_size), dtype=torch.long)
    offset = int(bos is not None)
    for i, row in enumerate(rows):
        if bos is not None:
            input_ids[i, 0] = bos
        input_ids[i, offset:offset + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :offset + len(row)] = 1
    keep = attention_mask.bool()
    if bos is not None and skip_bos:
        keep[:, 0] = False
    window_index = torch.arange(first_index, first_index + len(rows), dtype=torch.long)
    return TokenWindows(input_ids, attention_mask, keep, window_index)
