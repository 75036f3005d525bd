"""Reference outputs of every graph, computed by the torch ``ReSAE`` (the oracle).

Only the public ``ReSAE`` API is used (``encode``, ``encode_dense``, ``intervention_deltas``,
``decode``, ``sae_input``), in float32, whatever the precision of the graph under test. Top-k
codes are reordered by descending value, the order the graphs promise. :func:`layer_scores`
gives what the validation needs to recognise ties: each latent's ranking score and its
distance to the activation cut-off. For the intervention graph a residualized layer reads the
previous layer as the pass's edits left it (``h + δ``, :meth:`ReSAE.intervention_deltas`), so
its scores are computed on that input too.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from resae_serve.interventions import EditTable
from resae_serve.resae import ReSAE
from resae_serve.saes import SparseCodes


class LayerScores(NamedTuple):
    """Per-token ranking information of one layer, from the oracle."""

    score: np.ndarray
    """(N, d_sae) what top-k ranks: pre-activations (TopK) or dense codes (ReLU, JumpReLU)."""
    kth: np.ndarray
    """(N,) the k-th largest score of each token."""
    next_score: np.ndarray
    """(N,) the (k+1)-th largest score (−inf when k = d_sae)."""
    cutoff_gap: np.ndarray
    """(N, d_sae) distance of each pre-activation to where the latent switches on
    (0, or the JumpReLU threshold); ``inf`` for TopK latents outside the top k, whose code
    is 0 whichever side of 0 they lie."""


def _acts(resae: ReSAE, feeds: dict[str, np.ndarray]) -> dict[int, torch.Tensor]:
    return {L: torch.from_numpy(np.asarray(feeds[f"h_{L}"], dtype=np.float32))
            for L in resae.layers}


def _tables(resae: ReSAE, feeds: dict[str, np.ndarray]) -> dict[int, EditTable]:
    return {L: EditTable(*(torch.from_numpy(np.asarray(feeds[f"edit_{part}_{L}"]))
                           for part in ("feature", "op", "value")))
            for L in resae.layers}


def _deltas(resae: ReSAE, feeds: dict[str, np.ndarray]) -> dict[int, torch.Tensor]:
    return resae.intervention_deltas(_acts(resae, feeds), _tables(resae, feeds))


@torch.no_grad()
def layer_scores(resae: ReSAE, feeds: dict[str, np.ndarray],
                 graph: str = "encode") -> dict[int, LayerScores]:
    """Ranking scores of every layer for the activations in ``feeds``, on the inputs graph
    ``graph`` encodes (``intervention``: the previous layer edited, ``h + δ``)."""
    acts = _acts(resae, feeds)
    prev = acts
    if graph == "intervention":
        deltas = _deltas(resae, feeds)
        prev = {L: acts[L] + deltas[L] for L in resae.layers}
    out = {}
    for i, (L, sae) in enumerate(zip(resae.layers, resae.saes, strict=True)):
        u = resae.sae_input(i, acts[L], prev[resae.layers[i - 1]] if i else None)
        pre = sae.pre_acts(u)
        score = pre if sae.config.architecture == "topk" else sae.encode(u)
        k = sae.config.k
        top = score.topk(min(k + 1, sae.config.d_sae), dim=-1).values.double()
        kth = top[:, k - 1]
        after = top[:, k] if top.shape[1] > k else torch.full_like(kth, float("-inf"))
        cut = getattr(sae, "threshold", None)
        gap = (pre - cut if cut is not None else pre).abs().double()
        if sae.config.architecture == "topk":
            gap = gap.masked_fill(score.double() < kth[:, None], float("inf"))
        out[L] = LayerScores(score.double().numpy(), kth.numpy(), after.numpy(), gap.numpy())
    return out


@torch.no_grad()
def oracle_outputs(name: str, resae: ReSAE, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The torch ``ReSAE``'s outputs of graph ``name`` for ``feeds`` (float32 / int64)."""
    out: dict[str, np.ndarray] = {}
    if name == "encode":
        acts = _acts(resae, feeds)
        codes, dense = resae.encode(acts), resae.encode_dense(acts)
        for L in resae.layers:
            values, order = codes[L].values.sort(dim=-1, descending=True, stable=True)
            watch = torch.from_numpy(feeds[f"watch_{L}"])
            out[f"indices_{L}"] = codes[L].indices.gather(1, order).numpy()
            out[f"values_{L}"] = values.numpy()
            out[f"watched_{L}"] = dense[L].index_select(1, watch).numpy()
    elif name == "intervention":
        out.update({f"delta_{L}": delta.numpy() for L, delta in _deltas(resae, feeds).items()})
    else:
        codes = {L: SparseCodes(torch.from_numpy(feeds[f"indices_{L}"]),
                                torch.from_numpy(np.asarray(feeds[f"values_{L}"], np.float32)))
                 for L in resae.layers}
        out.update({f"reconstruction_{L}": x.numpy() for L, x in resae.decode(codes).items()})
    return out
