"""Find features by text: which latents are far more active on a text than on average.

The text is run through the model (BOS first, as in training), every dictionary layer is
encoded (teacher-forced chain), and each feature is scored by its lift
``mean code on the text / (mean code on held-out text + ε)``, where the held-out mean is
``density × mean activation`` from the catalog and ``ε`` is what ``prior_count`` firings at
the layer's typical strength would add over the catalog's tokens: a prior that keeps rare
features firing weakly on the text from outranking features that fire strongly (and a
feature never seen before from an infinite score). Attention-sink tokens are dropped as in
training.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from resae_serve.capture import LayerCapture
from resae_serve.catalog import Catalog, CatalogError
from resae_serve.evaluation.chain import inference_resae, teacher_forced
from resae_serve.resae import ReSAE


class TextCodes(NamedTuple):
    """A text's tokens and each dictionary layer's codes on them."""

    pieces: list[str]
    """Decoded token of every scored position."""
    codes: dict[int, torch.Tensor]
    """(T, d_sae) codes per layer, one row per entry of ``pieces``."""


class SearchHit(NamedTuple):
    """One feature found by :func:`search_features`."""

    layer: int
    feature: int
    score: float
    """Lift: mean code on the text over the held-out mean (+ ε)."""
    mean_on_text: float
    corpus_mean: float
    """``density × mean activation`` on held-out text."""
    fires_on: list[tuple[str, float]]
    """Tokens of the text where it is most active, with their codes."""
    label: str | None
    promoted: list[str]


def text_token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text``'s token ids with BOS first (as in training); refuses a text without tokens."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise CatalogError(f"text={text!r} has no tokens; give some text to search for")
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


@torch.no_grad()
def codes_from_activations(resae: ReSAE, tokenizer: PreTrainedTokenizerBase,
                           token_ids: list[int], acts: list[torch.Tensor], *,
                           outlier_norm_ratio: float | None = 10.0) -> TextCodes:
    """Codes of every dictionary layer from block outputs ``acts[i] (T, d)`` of ``token_ids``
    (from :func:`text_token_ids`; the BOS position and attention-sink tokens are dropped)."""
    resae = inference_resae(resae)
    start = 1 if token_ids and token_ids[0] == tokenizer.bos_token_id else 0
    ids = token_ids[start:]
    acts = [h[start:].float() for h in acts]
    keep = torch.ones(len(ids), dtype=torch.bool, device=acts[0].device)
    if outlier_norm_ratio is not None and len(ids) > 2:
        for h in acts:
            norms = h.norm(dim=-1)
            keep &= norms <= outlier_norm_ratio * norms.median()
    steps = teacher_forced(resae, [h[keep] for h in acts])
    pieces = [str(tokenizer.decode([t])) for t, k in zip(ids, keep.tolist(), strict=True) if k]
    return TextCodes(pieces, {layer: step.codes.cpu()
                              for layer, step in zip(resae.layers, steps, strict=True)})


@torch.no_grad()
def encode_text(resae: ReSAE, model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str,
                *, outlier_norm_ratio: float | None = 10.0) -> TextCodes:
    """Codes of every dictionary layer on ``text``, run through a Hugging Face ``model``."""
    token_ids = text_token_ids(tokenizer, text)
    input_ids = torch.tensor([token_ids])
    device = next(model.parameters()).device
    with LayerCapture(model, resae.layers) as capture:
        outputs = capture.run(input_ids.to(device), torch.ones_like(input_ids).to(device))
    return codes_from_activations(resae, tokenizer, token_ids,
                                  [outputs[layer][0] for layer in resae.layers],
                                  outlier_norm_ratio=outlier_norm_ratio)


def search_features(resae: ReSAE, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    catalog: Catalog, text: str, *, top: int = 10, n_tokens: int = 3,
                    layers: tuple[int, ...] | None = None, prior_count: float = 10.0,
                    ) -> list[SearchHit]:
    """The ``top`` features with the highest lift on ``text`` (see module docstring)."""
    return rank_features(encode_text(resae, model, tokenizer, text), catalog, top=top,
                         n_tokens=n_tokens, layers=layers, prior_count=prior_count)


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
        on_text = codes.mean(dim=0).double()
        lift = on_text / (corpus.double() + eps)
        best = lift.topk(min(top, len(lift)))
        candidates += [(float(s), layer, int(f), float(on_text[f]), float(corpus[f]))
                       for s, f in zip(best.values, best.indices, strict=True) if s > 0]
    hits = []
    for score, layer, f, on_text_f, corpus_f in sorted(candidates, reverse=True)[:top]:
        column = encoded.codes[layer][:, f]
        order = column.argsort(descending=True)[:n_tokens]
        info = catalog.feature(layer, f)
        hits.append(SearchHit(layer, f, score, on_text_f, corpus_f,
                              [(encoded.pieces[int(t)], float(column[t])) for t in order
                               if column[t] > 0],
                              info.label, info.promoted))
    return hits
