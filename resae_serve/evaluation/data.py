"""What an evaluation reads: dictionaries with their data settings, held-out activations and
held-out token windows, all resolved from the dictionary folders (flags may override)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from resae_serve.artifact import Manifest, load_artifact, read_manifest
from resae_serve.errors import ResaeError
from resae_serve.fingerprint import model_fingerprint
from resae_serve.models import resolve_model
from resae_serve.pipeline import DataConfig, cached_activations
from resae_serve.resae import ReSAE
from resae_serve.shards import read_shards
from resae_serve.windows import TokenWindows, iter_token_windows

logger = logging.getLogger(__name__)


class Dictionary(NamedTuple):
    """A loaded dictionary and the settings it was trained with."""

    name: str
    """Short name in reports (the folder name, made unique)."""
    folder: Path
    resae: ReSAE
    manifest: Manifest
    data: DataConfig
    """Data settings of training, with any overrides."""
    seed: int
    """Training seed (part of the cache key of its held-out activations)."""


def data_config(manifest: Manifest, *, model: str | None = None, corpus: str | None = None,
                ) -> DataConfig:
    """The dictionary's training ``DataConfig`` (defaults when absent), with overrides."""
    stored: dict[str, Any] = dict(manifest.training.get("data_config") or {})
    known = {f.name for f in fields(DataConfig)}
    data = DataConfig(**{k: v for k, v in stored.items() if k in known})
    if not stored:
        data = replace(data, model=manifest.model.name)
    if model is not None:
        data = replace(data, model=model)
    if corpus is not None:
        data = replace(data, corpus=corpus)
    return data


def load_dictionaries(folders: list[Path], *, model: str | None = None,
                      corpus: str | None = None) -> tuple[Path, list[Dictionary]]:
    """Load every folder, checking they all belong to one model; returns the model folder."""
    manifests = [read_manifest(folder) for folder in folders]
    model_dir = resolve_model(model or data_config(manifests[0]).model)
    fingerprint = model_fingerprint(model_dir)
    out: list[Dictionary] = []
    names: set[str] = set()
    for folder, manifest in zip(folders, manifests, strict=True):
        resae, manifest = load_artifact(folder, expect_fingerprint=fingerprint)
        name = folder.resolve().name
        while name in names:
            name += "'"
        names.add(name)
        data = replace(data_config(manifest, corpus=corpus), model=str(model_dir))
        seed = int(manifest.training.get("train_config", {}).get("seed", 0))
        out.append(Dictionary(name, folder, resae, manifest, data, seed))
    return model_dir, out


def heldout_activations(dictionary: Dictionary, n_tokens: int, *, progress: bool = True,
                        ) -> Iterator[torch.Tensor]:
    """``(N, n_layers, d)`` held-out activations, captured once into the cache, then read."""
    folder = cached_activations(dictionary.data, dictionary.resae.layers, "heldout", n_tokens,
                                seed=dictionary.seed, shuffle=False, progress=progress)
    remaining = n_tokens
    for batch in read_shards(folder):
        acts = batch.acts[:remaining].float()
        remaining -= len(acts)
        yield acts
        if remaining <= 0:
            return


def take_windows(documents: list[str], tokenizer: Any, *, n_windows: int, context_size: int,
                 batch_size: int) -> list[TokenWindows]:
    """The first ``n_windows`` windows of the documents, in batches (the last may be short)."""
    if n_windows < 1:
        raise ResaeError(f"n_windows={n_windows}; must be at least 1")
    out: list[TokenWindows] = []
    taken = 0
    for win in iter_token_windows(documents, tokenizer, context_size=context_size,
                                  batch_size=batch_size):
        win = TokenWindows(*(t[:n_windows - taken] for t in win))
        out.append(win)
        taken += len(win.input_ids)
        if taken >= n_windows:
            break
    if taken < n_windows:
        logger.warning("the held-out text gave %d windows of %d tokens, not %d", taken,
                       context_size, n_windows)
    return out
