"""Write captured activations to disk as safetensors shards, and read them back.

A shard folder holds ``shard-00000.safetensors`` … (tensors ``acts``, ``token_ids``, ``window``,
``position`` of :class:`~resae_serve.capture.ActivationBatch`) and ``shards.json`` describing
them: layers, d_model, dtype, token counts per shard and the capture settings. The index is
written last, so a folder without it is an interrupted write and is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from resae_serve.capture import ActivationBatch
from resae_serve.errors import ShardError

logger = logging.getLogger(__name__)

INDEX_FILE = "shards.json"
SHARD_SCHEMA_VERSION = 1


def write_shards(
    batches: Iterable[ActivationBatch],
    folder: Path,
    *,
    layers: tuple[int, ...],
    tokens_per_shard: int = 65_536,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the stream into shards of ``tokens_per_shard`` tokens; return the index written."""
    if tokens_per_shard < 1:
        raise ShardError(f"tokens_per_shard={tokens_per_shard}; must be positive")
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / INDEX_FILE).exists() or any(folder.glob("shard-*.safetensors")):
        raise ShardError(f"{folder} already holds shards; choose an empty folder or delete it")
    shards: list[dict[str, Any]] = []
    pending: list[ActivationBatch] = []
    held = 0
    d_model = dtype = None

    def flush(n: int) -> None:
        nonlocal pending, held
        merged = ActivationBatch(*(torch.cat(f) for f in zip(*pending, strict=True)))
        head = ActivationBatch(*(t[:n].contiguous().cpu() for t in merged))
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(head._asdict(), str(folder / name))
        shards.append({"file": name, "n_tokens": n})
        rest = ActivationBatch(*(t[n:] for t in merged))
        pending, held = ([rest], len(rest.acts)) if len(rest.acts) else ([], 0)

    for batch in batches:
        if batch.acts.shape[1] != len(layers):
            raise ShardError(f"batch has {batch.acts.shape[1]} layers, expected {len(layers)}")
        d_model, dtype = batch.acts.shape[2], str(batch.acts.dtype).removeprefix("torch.")
        pending.append(batch)
        held += len(batch.acts)
        while held >= tokens_per_shard:
            flush(tokens_per_shard)
    if held:
        flush(held)
    if not shards:
        raise ShardError("no activations to write: the stream was empty")
    index = {
        "schema_version": SHARD_SCHEMA_VERSION,
        "layers": list(layers),
        "d_model": d_model,
        "dtype": dtype,
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "shards": shards,
        "metadata": metadata or {},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    logger.info("wrote %d tokens in %d shards to %s", index["n_tokens"], len(shards), folder)
    return index


def read_index(folder: Path) -> dict[str, Any]:
    """Load and validate ``shards.json`` of a shard folder."""
    path = folder / INDEX_FILE
    if not path.is_file():
        raise ShardError(f"{path} not found: not a shard folder, or its write was interrupted")
    try:
        index: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:
        raise ShardError(f"{path} is not valid JSON: {exc}") from exc
    version = index.get("schema_version")
    if version != SHARD_SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version={version!r}; this version reads {SHARD_SCHEMA_VERSION}"
        )
    for key in ("layers", "d_model", "dtype", "n_tokens", "shards"):
        if key not in index:
            raise ShardError(f"{path}: field {key!r} is missing")
    return index


def read_shards(folder: Path) -> Iterator[ActivationBatch]:
    """Yield the batches of a shard folder, one per shard, checking each against the index."""
    index = read_index(folder)
    n_layers, d_model = len(index["layers"]), index["d_model"]
    for entry in index["shards"]:
        path = folder / entry["file"]
        try:
            tensors = load_file(str(path))
        except (FileNotFoundError, SafetensorError, OSError) as exc:
            raise ShardError(f"cannot read shard {path}: {exc}") from exc
        missing = set(ActivationBatch._fields) - tensors.keys()
        if missing:
            raise ShardError(f"shard {path} lacks tensors {sorted(missing)}")
        batch = ActivationBatch(**{k: tensors[k] for k in ActivationBatch._fields})
        expected = (entry["n_tokens"], n_layers, d_model)
        if tuple(batch.acts.shape) != expected:
            raise ShardError(
                f"shard {path}: acts has shape {tuple(batch.acts.shape)}, index says {expected}"
            )
        yield batch
