"""The feature catalog and text search on a tiny model, against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.capture import LayerCapture
from resae_serve.catalog import (
    HIGHLIGHT,
    CatalogConfig,
    CatalogError,
    build_catalog,
    format_feature,
    load_catalog,
    save_catalog,
    set_label,
)
from resae_serve.evaluation.search import encode_text, search_features
from resae_serve.windows import iter_token_windows
from tests.conftest import make_documents
from tests.unit.test_eval_support import random_dictionary, save_dictionary, save_tiny_setup

LAYERS = (1, 3)
CONFIG = CatalogConfig(n_tokens=200, context_size=24, batch_size=4, top_contexts=3, left=4,
                       right=2, top_tokens=5, outlier_norm_ratio=None)


@torch.no_grad()
def _independent_codes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                       documents: list[str], resae: torch.nn.Module) -> tuple[
                           dict[int, torch.Tensor], list[tuple[int, int]], list[list[int]]]:
    """Codes of the first 200 kept tokens, via LayerCapture and ReSAE.encode_dense."""
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    where: list[tuple[int, int]] = []
    windows: list[list[int]] = []
    with LayerCapture(model, LAYERS) as capture:
        for win in iter_token_windows(documents, tokenizer, context_size=24, batch_size=4):
            out = capture.run(win.input_ids, win.attention_mask)
            for layer in LAYERS:
                acts[layer].append(out[layer][win.keep])
            rows, cols = win.keep.nonzero(as_tuple=True)
            where += [(len(windows) + int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
            windows += win.input_ids.tolist()
            if len(where) >= 200:
                break
    codes = resae.encode_dense({layer: torch.cat(a)[:200] for layer, a in acts.items()})
    return codes, where[:200], windows


def test_catalog_statistics_contexts_and_tokens(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    documents = make_documents(20, 60, seed=7)
    resae = random_dictionary(LAYERS, "resae", seed=3)
    catalog = build_catalog(resae, tiny_llama, tiny_tokenizer, documents, CONFIG,
                            progress=False)
    assert catalog["n_tokens"] == 200
    codes, where, windows = _independent_codes(tiny_llama, tiny_tokenizer, documents, resae)
    for layer in LAYERS:
        z = codes[layer]
        features = catalog["layers"][str(layer)]["features"]
        assert len(features) == 64
        density = (z > 0).double().mean(0)
        for f in range(64):
            entry = features[f]
            assert entry["density"] == pytest.approx(float(density[f]))
            assert entry["max_activation"] == pytest.approx(float(z[:, f].max()), rel=1e-5)
            if density[f] > 0:
                active = z[:, f][z[:, f] > 0]
                assert entry["mean_activation"] == pytest.approx(float(active.mean()), rel=1e-5)
                top = entry["contexts"][0]
                assert top["activation"] == pytest.approx(float(z[:, f].max()), abs=1e-4)
                w, p = where[int(z[:, f].argmax())]
                token = tiny_tokenizer.decode([windows[w][p]])
                assert f"{HIGHLIGHT[0]}{token}{HIGHLIGHT[1]}" in top["text"]
                assert len(entry["contexts"]) <= 3
            else:
                assert entry["contexts"] == []
            assert entry["label"] is None
    # promoted tokens: direction carried by A to the last layer, times the norm weight, W_U
    for layer_index, layer in enumerate(LAYERS):
        direction = resae.saes[layer_index].W_dec.detach()
        if layer_index == 0:
            direction = direction @ resae.affine_map(1)[0].T
        logits = (direction * tiny_llama.model.norm.weight.detach()) @ tiny_llama.lm_head.weight.T
        for f in (0, 7):
            expected = [tiny_tokenizer.decode([t]) for t in logits[f].topk(5).indices.tolist()]
            assert catalog["layers"][str(layer)]["features"][f]["promoted"] == expected
            lowest = (-logits[f]).topk(5).indices.tolist()
            assert catalog["layers"][str(layer)]["features"][f]["suppressed"] == [
                tiny_tokenizer.decode([t]) for t in lowest]


def test_save_load_labels_and_staleness(
    tmp_path: Path, tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    model_dir, corpus = save_tiny_setup(tmp_path, tiny_llama, tiny_tokenizer)
    resae = random_dictionary(LAYERS, "resae", seed=3)
    folder = save_dictionary(resae, tmp_path / "dict", model_dir, corpus)
    with pytest.raises(CatalogError, match="--build"):
        load_catalog(folder)
    documents = make_documents(20, 60, seed=7)
    save_catalog(folder, build_catalog(resae, tiny_llama, tiny_tokenizer, documents, CONFIG,
                                       progress=False))
    info = set_label(folder, 3, 5, "w-words")
    assert info.label == "w-words" and "label: w-words" in format_feature(info)
    save_catalog(folder, build_catalog(resae, tiny_llama, tiny_tokenizer, documents, CONFIG,
                                       progress=False))               # rebuilt: label kept
    catalog = load_catalog(folder)
    assert catalog.feature(3, 5).label == "w-words"
    assert catalog.feature(1, 5).label is None
    with pytest.raises(CatalogError, match=r"feature=64 at layer 3; allowed 0..63"):
        catalog.feature(3, 64)
    with pytest.raises(CatalogError, match=r"layer=2 is not in the feature catalog"):
        catalog.feature(2, 0)
    data = json.loads((folder / "features.json").read_text())
    data["dictionary"] = "0" * 16
    (folder / "features.json").write_text(json.dumps(data))
    with pytest.raises(CatalogError, match="stale"):
        load_catalog(folder)


def test_search_ranks_by_lift(
    tmp_path: Path, tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    model_dir, corpus = save_tiny_setup(tmp_path, tiny_llama, tiny_tokenizer)
    resae = random_dictionary(LAYERS, "resae", seed=3)
    folder = save_dictionary(resae, tmp_path / "dict", model_dir, corpus)
    save_catalog(folder, build_catalog(resae, tiny_llama, tiny_tokenizer,
                                       make_documents(20, 60, seed=7), CONFIG, progress=False))
    catalog = load_catalog(folder)
    text = "w1 w2 w3 w4 w5 w6 w7 w8"
    hits = search_features(resae, tiny_llama, tiny_tokenizer, catalog, text, top=5)
    assert len(hits) == 5
    encoded = encode_text(resae, tiny_llama, tiny_tokenizer, text)
    assert encoded.pieces == text.split()       # read as the tokenizer gives it (no BOS here)
    for layer in LAYERS:   # unknown training context: only the first position is left out
        assert encoded.in_distribution[layer].tolist() == [False] + [True] * 7
    best = []
    for layer in LAYERS:
        features = catalog.data["layers"][str(layer)]["features"]
        corpus_mean = torch.tensor([f["density"] * f["mean_activation"] for f in features])
        eps = 10 * catalog.mean_code(layer) / catalog.n_tokens
        lift = encoded.codes[layer][1:].mean(0).double() / (corpus_mean.double() + eps)
        best += [(float(v), layer, f) for f, v in enumerate(lift.tolist())]
    best.sort(reverse=True)
    assert [(h.layer, h.feature) for h in hits] == [(layer, f) for _, layer, f in best[:5]]
    assert hits[0].score == pytest.approx(best[0][0])
    assert hits[0].fires_on and hits[0].fires_on[0][0] in text.split()
    only3 = search_features(resae, tiny_llama, tiny_tokenizer, catalog, text, top=3, layers=(3,))
    assert {h.layer for h in only3} == {3}
    with pytest.raises(CatalogError, match="no tokens"):
        search_features(resae, tiny_llama, tiny_tokenizer, catalog, "", top=3)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_search_encodes_through_the_export_like_torch(tmp_path: Path, architecture: str) -> None:
    """SearchFeatures' encode through onnxruntime (the export's encode graph) equals the torch
    chain for TopK dictionaries; ReLU ones, whose codes exceed the graph's k slots, are
    encoded by torch whatever runtime is given."""
    pytest.importorskip("onnxruntime")
    from resae_serve.artifact import save_artifact
    from resae_serve.evaluation.search import encode_activations
    from resae_serve.export.convert import export_artifact
    from resae_serve.export.runtime import RuntimeConfig, open_runtime
    from resae_serve.export.spec import ExportConfig
    from tests.unit.resae_fixtures import IDENTITY, LAYERS, tiny_acts, tiny_resae

    resae = tiny_resae("resae", architecture)
    artifact = save_artifact(resae, tmp_path / "dict", IDENTITY)
    export_artifact(artifact, tmp_path / "export",
                    ExportConfig(graphs=("encode",), reference_tokens=0))
    runtime = open_runtime(tmp_path / "export", RuntimeConfig(backend="onnxruntime"))
    acts = tiny_acts(12)
    via_runtime = encode_activations(resae, [acts[L] for L in LAYERS], runtime)
    via_torch = encode_activations(resae, [acts[L] for L in LAYERS])
    for ours, oracle in zip(via_runtime, via_torch, strict=True):
        assert ours.shape == oracle.shape
        torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=0)
        assert (ours > 0).sum() > 0
