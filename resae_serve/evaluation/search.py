"""Find features by text: which latents are far more active on a text than on average.

The text is read as the server reads a prompt (as the tokenizer gives it: the same ids
Inspect and Generate's monitor see), run through the model, every dictionary layer is encoded
(teacher-forced chain: each layer from its own clean activations, as the monitor encodes an
unsteered prompt), and each feature is scored by its lift
``mean code on the text / (mean code on held-out text + ε)``, where the held-out mean is
``density × mean activation`` from the catalog and ``ε`` is what ``prior_count`` firings at
the layer's typical strength would add over the catalog's tokens: a prior that keeps rare
features firing weakly on the text from outranking features that fire strongly (and a
feature never seen before from an infinite score). Only positions inside the dictionary's
training distribution are scored (:mod:`resae_serve.context`: not the first position when
training skipped it, not norm outliers by the training rule), so a hit fires on tokens where
Inspect reports the same values, unflagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from resae_serve.capture import LayerCapture
from resae_serve.catalog import Catalog, CatalogError
from resae_serve.context import OutOfDistribution, TrainingContext
from resae_serve.evaluation.chain import inference_resae, teacher_forced
from resae_serve.export.runtime import FeatureRuntime
from resae_serve.resae import ReSAE


class TextCodes(NamedTuple):
    """A text's tokens and each dictionary layer's codes on them."""

    pieces: list[str]
    """Decoded token of every position."""
    codes: dict[int, torch.Tensor]
    """(T, d_sae) codes per layer, one row per entry of ``pieces``."""
    in_distribution: dict[int, torch.Tensor]
    """(T,) bool per layer: the positions search scores (inside the training distribution)."""


class SearchHit(NamedTuple):
    """One feature found by :func:`search_features`."""

    layer: int
    feature: int
    score: float
    """Lift: mean code on the text's in-distribution positions over the held-out mean (+ ε)."""
    mean_on_text: float
    corpus_mean: float
    """``density × mean activation`` on held-out text."""
    fires_on: list[tuple[str, float]]
    """In-distribution tokens of the text where it is most active, with their codes."""
    label: str | None
    promoted: list[str]


def text_token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text``'s token ids as the tokenizer gives them (special tokens included as it adds
    them, as the server reads a prompt); refuses a text without tokens."""
    ids = list(tokenizer(text)["input_ids"]) if text else []
    if not ids:
        raise CatalogError(f"text={text!r} has no tokens; give some text to search for")
    return ids


def out_of_distribution(context: TrainingContext, acts: Sequence[torch.Tensor]
                        ) -> list[np.ndarray]:
    """:class:`~resae_serve.context.OutOfDistribution` codes per layer of block outputs
    ``acts[i] (T, d)`` at positions ``0 .. T-1`` (what the monitor flags)."""
    return [context.reasons(i, np.arange(len(h)), h.float().norm(dim=-1).cpu().numpy())
            for i, h in enumerate(acts)]


@torch.no_grad()
def encode_activations(resae: ReSAE, acts: Sequence[torch.Tensor],
                       runtime: FeatureRuntime | None = None) -> list[torch.Tensor]:
    """Dense codes ``(T, d_sae)`` of every layer from clean block outputs ``acts[i] (T, d)``
    (each residual layer reads the previous layer's clean output): the one encode search
    makes.

    With a ``runtime`` (e.g. the server's onnxruntime session over the export) the codes come
    from its ``encode`` graph when every layer is a TopK SAE, whose ``k`` slots hold all its
    non-zero codes; ReLU / JumpReLU codes beyond the graph's ``k`` slots would be lost, so
    those dictionaries are encoded by the torch chain."""
    if runtime is not None and all(s.config.architecture == "topk" for s in resae.saes):
        out = runtime.encode({layer: h.float() for layer, h in
                              zip(resae.layers, acts, strict=True)})
        dense = []
        for layer, sae in zip(resae.layers, resae.saes, strict=True):
            indices, values = out.codes[layer]
            dense.append(torch.zeros(len(values), sae.config.d_sae).scatter_(
                1, indices.cpu(), values.float().cpu()))
        return dense
    steps = teacher_forced(inference_resae(resae), [h.float() for h in acts])
    return [step.codes.cpu() for step in steps]


def codes_from_activations(resae: ReSAE, tokenizer: PreTrainedTokenizerBase,
                           token_ids: list[int], acts: Sequence[torch.Tensor], *,
                           context: TrainingContext | None = None,
                           reasons: Sequence[np.ndarray] | None = None,
                           runtime: FeatureRuntime | None = None) -> TextCodes:
    """Codes of every dictionary layer from block outputs ``acts[i] (T, d)`` of ``token_ids``
    (from :func:`text_token_ids`), with the in-distribution positions per layer: from
    ``reasons`` (per layer, e.g. the engine's flags) or else by ``context``'s rule (default
    :meth:`TrainingContext.unknown`); encoded by ``runtime`` where it can
    (:func:`encode_activations`)."""
    if reasons is None:
        reasons = out_of_distribution(context or TrainingContext.unknown(), acts)
    codes = encode_activations(resae, acts, runtime)
    pieces = [str(tokenizer.decode([t])) for t in token_ids]
    return TextCodes(pieces, dict(zip(resae.layers, codes, strict=True)),
                     {layer: torch.from_numpy(np.asarray(r) == OutOfDistribution.NONE)
                      for layer, r in zip(resae.layers, reasons, strict=True)})


@torch.no_grad()
def encode_text(resae: ReSAE, model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str,
                *, context: TrainingContext | None = None) -> TextCodes:
    """Codes of every dictionary layer on ``text``, run through a Hugging Face ``model``."""
    token_ids = text_token_ids(tokenizer, text)
    input_ids = torch.tensor([token_ids])
    device = next(model.parameters()).device
    with LayerCapture(model, resae.layers) as capture:
        outputs = capture.run(input_ids.to(device), torch.ones_like(input_ids).to(device))
    return codes_from_activations(resae, tokenizer, token_ids,
                                  [outputs[layer][0] for layer in resae.layers],
                                  context=context)


def search_features(resae: ReSAE, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    catalog: Catalog, text: str, *, top: int = 10, n_tokens: int = 3,
                    layers: tuple[int, ...] | None = None, prior_count: float = 10.0,
                    context: TrainingContext | None = None) -> list[SearchHit]:
    """The ``top`` features with the highest lift on ``text`` (see module docstring);
    ``context``: the dictionary's training context (its manifest's)."""
    return rank_features(encode_text(resae, model, tokenizer, text, context=context), catalog,
                         top=top, n_tokens=n_tokens, layers=layers, prior_count=prior_count)


def rank_features(encoded: TextCodes, catalog: Catalog, *, top: int = 10, n_tokens: int = 3,
                  layers: tuple[int, ...] | None = None, prior_count: float = 10.0
                  ) -> list[SearchHit]:
    """Score every feature of ``encoded`` by lift and keep the ``top`` (module docstring)."""
    candidates: list[tuple[float, int, int, float, float]] = []
    for layer, codes in encoded.codes.items():
        if layers is not None and layer not in layers:
            continue
        features = catalog.data["layers"][str(layer)]["features"]
        corpus = torch.tensor([f["density"] * f["mean_activation"] for f in features])
        eps = prior_count * catalog.mean_code(layer) / max(catalog.n_tokens, 1)
        keep = encoded.in_distribution[layer]
        if not bool(keep.any()):
            continue                                # nothing this layer can be judged on
        on_text = codes[keep].mean(dim=0).double()
        lift = on_text / (corpus.double() + eps)
        best = lift.topk(min(top, len(lift)))
        candidates += [(float(s), layer, int(f), float(on_text[f]), float(corpus[f]))
                       for s, f in zip(best.values, best.indices, strict=True) if s > 0]
    hits = []
    for score, layer, f, on_text_f, corpus_f in sorted(candidates, reverse=True)[:top]:
        column = encoded.codes[layer][:, f].masked_fill(~encoded.in_distribution[layer], 0.0)
        order = column.argsort(descending=True)[:n_tokens]
        info = catalog.feature(layer, f)
        hits.append(SearchHit(layer, f, score, on_text_f, corpus_f,
                              [(encoded.pieces[int(t)], float(column[t])) for t in order
                               if column[t] > 0],
                              info.label, info.promoted))
    return hits
