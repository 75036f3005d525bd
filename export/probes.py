"""Inputs to check graphs with (and to trace them from): random and real-scale probes.

``random``: every layer's activations drawn independently, ``2·N(0, 1)``, far from anything a
model produces, which exercises the chain on arbitrary inputs. ``real-scale``: activations
built through the dictionary's own chain, ``h_0 = s_0 (b_dec + g)``,
``h_m = A_m h_{m−1} + c_m + σ_m (b_dec + g)`` (``s_m (b_dec + g)`` in layerwise mode), so every
SAE sees inputs of the size and offset it was trained on. Watched features and edits mix
latents active on the token (read from the torch ``ReSAE``) with random ones, and use every
edit op, so clamp / scale / ablate act on non-zero codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from resae_serve.resae import ReSAE
from resae_serve.shards import read_index, read_shards

from .errors import ExportError

Probe = Literal["random", "real-scale"]
PROBES: tuple[str, ...] = get_args(Probe)
WATCH_PER_LAYER = 6
EDITS_PER_LAYER = 3


@torch.no_grad()
def probe_activations(resae: ReSAE, probe: str, tokens: int, seed: int) -> dict[int, torch.Tensor]:
    """Float32 activations ``{layer: (tokens, d_model)}`` of the named probe."""
    if probe not in PROBES:
        raise ExportError(f"probe={probe!r}; allowed: {', '.join(PROBES)}")
    g = torch.Generator().manual_seed(seed)
    acts: dict[int, torch.Tensor] = {}
    prev: torch.Tensor | None = None
    for i, (layer, sae) in enumerate(zip(resae.layers, resae.saes, strict=True)):
        noise = torch.randn(tokens, resae.d_model, generator=g)
        if probe == "random":
            h = 2 * noise
        else:
            h = float(resae.scales[i]) * (sae.b_dec.detach().float() + noise)
            if resae.mode == "resae" and prev is not None:
                h = h + resae.predict(i, prev)
        acts[layer] = prev = h
    return acts


def captured_activations(shards: Path, layers: tuple[int, ...],
                         tokens: int) -> dict[int, torch.Tensor]:
    """The first ``tokens`` captured activations of ``layers`` from a shard folder (the
    ``real`` probe: what the model really produced, e.g. held-out text)."""
    index = read_index(shards)
    missing = [L for L in layers if L not in index["layers"]]
    if missing:
        raise ExportError(f"{shards}: captured layers are {index['layers']}; the dictionary "
                          f"also needs {missing}")
    columns = [index["layers"].index(L) for L in layers]
    parts, have = [], 0
    for batch in read_shards(shards):
        parts.append(batch.acts[: tokens - have, columns].float())
        have += len(parts[-1])
        if have >= tokens:
            break
    acts = torch.cat(parts)  # (N, n_layers, d)
    return {L: acts[:, i].contiguous() for i, L in enumerate(layers)}


def graph_inputs(name: str, resae: ReSAE, probe: str, tokens: int, seed: int,
                 acts: dict[int, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Inputs of graph ``name`` in spec order; floats as float32 (cast for float16 graphs).

    ``acts`` replaces the probe's activations (e.g. :func:`captured_activations`)."""
    if acts is None:
        acts = probe_activations(resae, probe, tokens, seed)
    tokens = len(acts[resae.layers[0]])
    g = np.random.default_rng(seed + 1)
    with torch.no_grad():
        codes = resae.encode(acts)
    feeds: dict[str, np.ndarray] = {}
    if name in ("encode", "intervention"):
        feeds.update({f"h_{L}": acts[L].numpy() for L in resae.layers})
    for L, sae in zip(resae.layers, resae.saes, strict=True):
        order = codes[L].values.argsort(dim=-1, descending=True, stable=True)
        d_sae, top = sae.config.d_sae, codes[L].indices.gather(1, order).numpy()  # (N, k)
        if name == "encode":
            n_watch = min(WATCH_PER_LAYER, d_sae)
            candidates = [*top[: n_watch // 2, 0], *g.choice(d_sae, n_watch, replace=False)]
            ids = list(dict.fromkeys(int(i) for i in candidates))[:n_watch]
            feeds[f"watch_{L}"] = np.array(ids, dtype=np.int64)
        elif name == "intervention":
            feature = g.integers(0, d_sae, (tokens, EDITS_PER_LAYER))
            feature[:, 0] = top[:, 0]
            feature[:, 1] = top[:, top.shape[1] // 2]
            feeds[f"edit_feature_{L}"] = feature.astype(np.int64)
            feeds[f"edit_op_{L}"] = g.integers(0, 5, (tokens, EDITS_PER_LAYER)).astype(np.int64)
            feeds[f"edit_value_{L}"] = g.normal(0, 2, (tokens, EDITS_PER_LAYER)).astype(
                np.float32)
        else:
            feeds[f"indices_{L}"] = codes[L].indices.numpy().astype(np.int64)
            feeds[f"values_{L}"] = codes[L].values.numpy().astype(np.float32)
    return feeds
