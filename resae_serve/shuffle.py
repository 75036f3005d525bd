"""Shuffle a stream of activation batches through a bounded buffer.

The buffer fills to ``capacity`` tokens, is permuted, and its first half goes out while the
second half waits to be mixed with new tokens (the scheme of SAELens' mixing buffer). Memory
stays bounded by ``capacity`` tokens plus one incoming batch; the order is fixed by the seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from resae_serve.errors import CaptureError

B = TypeVar("B", bound=tuple)  # a NamedTuple of tensors sharing their first dimension


def _cat(parts: list[B]) -> B:
    first = parts[0]
    return type(first)(*(torch.cat(fields) for fields in zip(*parts, strict=True)))


def _take(batch: B, index: torch.Tensor) -> B:
    return type(batch)(*(field[index.to(field.device)] for field in batch))


def shuffled(stream: Iterable[B], capacity: int, *, seed: int = 0) -> Iterator[B]:
    """Yield the rows of ``stream`` in a seeded random order, holding about ``capacity`` rows."""
    if capacity < 2:
        raise CaptureError(f"shuffle buffer capacity={capacity}; must be at least 2 tokens")
    generator = torch.Generator().manual_seed(seed)
    pending: list[B] = []
    held = 0
    for batch in stream:
        pending.append(batch)
        held += len(batch[0])
        if held >= capacity:
            buffer = _cat(pending)
            perm = torch.randperm(held, generator=generator)
            n_out = held - capacity // 2
            yield _take(buffer, perm[:n_out])
            pending, held = [_take(buffer, perm[n_out:])], capacity // 2
    if held:
        buffer = _cat(pending)
        yield _take(buffer, torch.randperm(held, generator=generator))
