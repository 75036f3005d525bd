"""The feature catalog: what each latent of a dictionary does, stored next to the dictionary.

``features.json`` in the dictionary folder (the artifact loader ignores it; it is read only
when asked for) holds, per layer and feature: density on held-out text, mean activation when
active, max activation, the top activating contexts (a short window of tokens with the
activating one marked ``[[like this]]``), the output tokens its decoder direction promotes and
suppresses through the unembedding, and a ``label`` for humans (kept when the catalog is
rebuilt). In resae mode the direction of layer m is first carried to the last dictionary
layer by the affine chain ``A_M ⋯ A_{m+1}``, the way the stream carries it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from resae_serve.artifact import MANIFEST, ArtifactError
from resae_serve.capture import CaptureConfig, capture_activations
from resae_serve.evaluation.chain import inference_resae, teacher_forced
from resae_serve.evaluation.unembed import promoted_tokens
from resae_serve.resae import ReSAE
from resae_serve.windows import iter_token_windows

logger = logging.getLogger(__name__)

CATALOG_FILE = "features.json"
CATALOG_FORMAT = "resae-feature-catalog"
CATALOG_VERSION = 1
HIGHLIGHT = ("[[", "]]")


class CatalogError(ArtifactError):
    """A feature catalog is missing, stale, or asked for a layer or feature it lacks."""


@dataclass(frozen=True)
class CatalogConfig:
    """How the catalog is measured."""

    n_tokens: int = 20_000
    """Held-out tokens the statistics and contexts come from."""
    context_size: int = 128
    """Tokens per window (BOS included)."""
    batch_size: int = 8
    """Windows per forward pass."""
    top_contexts: int = 5
    """Top activating contexts kept per feature."""
    left: int = 10
    """Tokens shown before the activating token."""
    right: int = 3
    """Tokens shown after it."""
    top_tokens: int = 8
    """Promoted (and suppressed) output tokens listed per feature."""
    outlier_norm_ratio: float | None = 10.0
    """Skip attention-sink tokens, as training did (see ``CaptureConfig``)."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "context_size", "batch_size", "top_contexts", "top_tokens"):
            if getattr(self, name) < 1:
                raise CatalogError(f"{name}={getattr(self, name)}; must be at least 1")


class _LayerStats:
    """Streaming per-feature counts, sums, maxima and top-activation token indices."""

    def __init__(self, d_sae: int, top: int) -> None:
        self.count = torch.zeros(d_sae, dtype=torch.float64)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.top_values = torch.zeros(d_sae, 0)
        self.top_index = torch.zeros(d_sae, 0, dtype=torch.long)
        self.top = top

    def update(self, codes: torch.Tensor, offset: int) -> None:
        """Add codes ``(N, d_sae)`` of tokens ``offset .. offset + N − 1``."""
        codes = codes.float().cpu()
        self.count += (codes > 0).sum(0).double()
        self.total += codes.sum(0).double()
        values, index = codes.T.topk(min(self.top, len(codes)), dim=1)          # (d_sae, k)
        values = torch.cat([self.top_values, values], dim=1)
        index = torch.cat([self.top_index, index + offset], dim=1)
        self.top_values, order = values.topk(min(self.top, values.shape[1]), dim=1)
        self.top_index = index.gather(1, order)


def dictionary_digest(folder: Path) -> str:
    """A digest of the dictionary's tensor files, to tell whether a catalog is stale."""
    files = json.loads((folder / MANIFEST).read_text()).get("files", {})
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _decoder(tokenizer: PreTrainedTokenizerBase) -> Any:
    @cache
    def piece(token_id: int) -> str:
        return str(tokenizer.decode([token_id])).replace("\n", "↵")
    return piece


@torch.no_grad()
def build_catalog(resae: ReSAE, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                  documents: list[str], config: CatalogConfig, *, progress: bool = True,
                  ) -> dict[str, Any]:
    """Measure every feature of ``resae`` on ``documents`` (held-out text); JSON-ready."""
    resae = inference_resae(resae)
    capture = CaptureConfig(layers=resae.layers, context_size=config.context_size,
                            batch_size=config.batch_size, max_tokens=config.n_tokens,
                            outlier_norm_ratio=config.outlier_norm_ratio, progress=progress)
    stats = [_LayerStats(sae.config.d_sae, config.top_contexts) for sae in resae.saes]
    where: list[torch.Tensor] = []                     # (N, 2) window index, position
    offset = 0
    for batch in capture_activations(model, tokenizer, documents, capture):
        acts = batch.acts.float()
        steps = teacher_forced(resae, [acts[:, i] for i in range(len(resae.layers))])
        for layer_stats, step in zip(stats, steps, strict=True):
            layer_stats.update(step.codes, offset)
        where.append(torch.stack([batch.window, batch.position], dim=1))
        offset += len(acts)
    locations = torch.cat(where)
    windows = _window_tokens(documents, tokenizer, config, int(locations[:, 0].max()) + 1)
    piece = _decoder(tokenizer)
    layers: dict[str, Any] = {}
    for i, (layer, layer_stats) in enumerate(zip(resae.layers, stats, strict=True)):
        promoted = promoted_tokens(model, resae, i, config.top_tokens)
        features = []
        for f in range(resae.saes[i].config.d_sae):
            count = float(layer_stats.count[f])
            contexts = [
                {"activation": round(float(v), 4),
                 "text": _context(windows, locations[int(t)], config, piece)}
                for v, t in zip(layer_stats.top_values[f], layer_stats.top_index[f], strict=True)
                if v > 0
            ]
            features.append({
                "density": count / offset,
                "mean_activation": float(layer_stats.total[f]) / count if count else 0.0,
                "max_activation": float(layer_stats.top_values[f, 0]),
                "contexts": contexts,
                "promoted": [piece(t) for t in promoted.promoted[f].tolist()],
                "suppressed": [piece(t) for t in promoted.suppressed[f].tolist()],
                "label": None,
            })
        layers[str(layer)] = {"mean_code": float(layer_stats.total.sum() /
                                                 max(float(layer_stats.count.sum()), 1.0)),
                              "features": features}
    return {"format": CATALOG_FORMAT, "version": CATALOG_VERSION, "mode": resae.mode,
            "layers": layers, "n_tokens": offset, "settings": asdict(config)}


def _window_tokens(documents: list[str], tokenizer: PreTrainedTokenizerBase,
                   config: CatalogConfig, n_windows: int) -> list[list[int]]:
    """Token ids of the first ``n_windows`` windows, cut exactly as capture cut them."""
    rows: list[list[int]] = []
    for win in iter_token_windows(documents, tokenizer, context_size=config.context_size,
                                  batch_size=config.batch_size):
        for ids, mask in zip(win.input_ids, win.attention_mask, strict=True):
            rows.append(ids[mask.bool()].tolist())
        if len(rows) >= n_windows:
            break
    return rows


def _context(windows: list[list[int]], location: torch.Tensor, config: CatalogConfig,
             piece: Any) -> str:
    window, position = int(location[0]), int(location[1])
    ids = windows[window]
    start = max(1 if position > 0 else 0, position - config.left)   # never show the BOS
    before = "".join(piece(t) for t in ids[start:position])
    after = "".join(piece(t) for t in ids[position + 1:position + 1 + config.right])
    return f"{before}{HIGHLIGHT[0]}{piece(ids[position])}{HIGHLIGHT[1]}{after}"


# ---------------------------------------------------------------------- storage


def save_catalog(folder: Path, catalog: dict[str, Any]) -> Path:
    """Write ``features.json`` into the dictionary folder, keeping any existing labels."""
    path = folder / CATALOG_FILE
    catalog = {**catalog, "dictionary": dictionary_digest(folder)}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            for layer, entry in old.get("layers", {}).items():
                for f, feature in enumerate(entry.get("features", [])):
                    if feature.get("label") and layer in catalog["layers"]:
                        catalog["layers"][layer]["features"][f]["label"] = feature["label"]
        except (ValueError, IndexError, KeyError):
            logger.warning("could not carry labels over from %s; it is replaced", path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(catalog, ensure_ascii=False, separators=(",", ":")) + "\n")
    tmp.replace(path)
    logger.info("wrote the feature catalog %s", path)
    return path


class FeatureInfo(NamedTuple):
    """One feature as the catalog describes it."""

    layer: int
    feature: int
    density: float
    """Fraction of held-out tokens on which it fired."""
    mean_activation: float
    """Mean code when active."""
    max_activation: float
    contexts: list[dict[str, Any]]
    """``{"activation", "text"}`` with the activating token in ``[[ ]]``."""
    promoted: list[str]
    suppressed: list[str]
    label: str | None


class Catalog:
    """A loaded ``features.json``."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data, self.path = data, path
        self.layers = tuple(int(layer) for layer in data["layers"])
        self.n_tokens = int(data["n_tokens"])

    def mean_code(self, layer: int) -> float:
        """Mean active code of a layer (a typical activation strength)."""
        return float(self._layer(layer)["mean_code"])

    def _layer(self, layer: int) -> dict[str, Any]:
        if str(layer) not in self.data["layers"]:
            raise CatalogError(f"layer={layer} is not in the feature catalog; its layers "
                               f"are {list(self.layers)}")
        entry: dict[str, Any] = self.data["layers"][str(layer)]
        return entry

    def n_features(self, layer: int) -> int:
        """Latents of a layer."""
        return len(self._layer(layer)["features"])

    def feature(self, layer: int, feature: int) -> FeatureInfo:
        """The entry of one feature, with a clear error for a bad layer or id."""
        features = self._layer(layer)["features"]
        if not 0 <= feature < len(features):
            raise CatalogError(f"feature={feature} at layer {layer}; allowed "
                               f"0..{len(features) - 1}")
        f = features[feature]
        return FeatureInfo(layer, feature, f["density"], f["mean_activation"],
                           f["max_activation"], f["contexts"], f["promoted"], f["suppressed"],
                           f.get("label"))


def load_catalog(folder: Path) -> Catalog:
    """Read ``features.json`` of a dictionary folder; refuse one built for other weights."""
    path = Path(folder) / CATALOG_FILE
    if not path.is_file():
        raise CatalogError(f"{path} not found: build it with `resae features {folder} --build`")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CatalogError(f"{path} is not valid JSON: {exc}") from exc
    if data.get("format") != CATALOG_FORMAT or data.get("version") != CATALOG_VERSION:
        raise CatalogError(f"{path}: field 'format'/'version' is {data.get('format')!r}/"
                           f"{data.get('version')!r}; expected {CATALOG_FORMAT!r}/"
                           f"{CATALOG_VERSION}")
    if data.get("dictionary") != (digest := dictionary_digest(Path(folder))):
        raise CatalogError(f"{path}: field 'dictionary' is {data.get('dictionary')!r} but the "
                           f"dictionary's tensors give {digest!r}; the catalog is stale, "
                           f"rebuild it with `resae features {folder} --build`")
    return Catalog(data, path)


def set_label(folder: Path, layer: int, feature: int, label: str | None) -> FeatureInfo:
    """Give a feature a human label (None clears it); written into ``features.json``."""
    catalog = load_catalog(folder)
    catalog.feature(layer, feature)  # validates layer and id
    catalog.data["layers"][str(layer)]["features"][feature]["label"] = label or None
    path = catalog.path
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(catalog.data, ensure_ascii=False, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return catalog.feature(layer, feature)


def format_feature(info: FeatureInfo) -> str:
    """A feature as a few readable lines."""
    lines = [f"layer {info.layer} feature {info.feature}"
             + (f"  label: {info.label}" if info.label else ""),
             f"  density {info.density:.3%}   mean activation {info.mean_activation:.3f}   "
             f"max {info.max_activation:.3f}",
             "  promotes:   " + " ".join(repr(t) for t in info.promoted),
             "  suppresses: " + " ".join(repr(t) for t in info.suppressed),
             "  top contexts:"]
    lines += [f"    {c['activation']:8.3f}  {c['text']}" for c in info.contexts]
    if not info.contexts:
        lines.append("    (never active on the catalog's held-out tokens)")
    return "\n".join(lines)
