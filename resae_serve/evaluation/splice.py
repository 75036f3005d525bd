"""Splicing: replace block outputs by dictionary reconstructions inside a forward pass.

Conditions, all scored on the same tokens (docs/ARCHITECTURE.md §1.6, §2):

- **single layer m**: only ``h_m`` is replaced by ``x̂_m`` (chain reconstruction from clean
  encodings; the same in both modes, since nothing upstream changed);
- **single layer m, local** (resae mode, not the first layer): ``h_m`` replaced by
  ``A_m h_{m−1,clean} + c_m + σ_m D_m(z_m)``, so the residual SAE's own error is measured
  without the errors the chain carries down from the layers above;
- **joint, teacher-forced** (``teacher_forced``): every layer replaced by the reconstruction
  computed from the clean pass. This always equals replacing the last layer alone (the blocks
  after it read only what it writes), kept because it is the literal reading;
- **joint, teacher-forced additive** (``teacher_forced_additive``): every encoder reads the
  clean pass (teacher forcing), and each layer *adds* its own error ``e_m = x̂_m − h_m`` (the
  local reconstruction for a ReSAE, whose chained error would count the upstream errors twice:
  once through ``A`` and once through the blocks) to the stream as it arrives, so every
  layer's error reaches the output and errors compound through the blocks between them;
- **joint, online** (``online``): one patched pass; each encoder reads the stream as already
  changed by the replacements upstream, and a residual layer's ``h_prev`` is the spliced value
  (chained and local coincide there);
- **mean ablation** of the same layers (the baseline of CE recovered).

Only kept positions are replaced (not BOS, not padding), and a next-token prediction is scored
where its own position was kept and the target is a real token. Per condition:
CE, ΔCE = CE − CE_clean, KL(p_clean ‖ p_spliced) per token and CE recovered
= (CE_ablate − CE) / (CE_ablate − CE_clean). The interaction term is
ΔCE_joint − Σ ΔCE_single. :func:`error_preserving_hooks` splices ``x̂ + (x − x̂)`` with feature
edits, i.e. ``h + δ``, the form interventions use.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from resae_serve.evaluation.chain import (
    chain_step,
    inference_resae,
    local_reconstruction,
    teacher_forced,
)
from resae_serve.evaluation.hooks import (
    BlockFn,
    added_at,
    constant_at,
    forward_logits,
    recorder,
    replace_at,
)
from resae_serve.interventions import EditTable
from resae_serve.resae import ReSAE
from resae_serve.windows import TokenWindows

logger = logging.getLogger(__name__)

SpliceMode = Literal["teacher_forced", "teacher_forced_additive", "online"]
SPLICE_MODES: tuple[str, ...] = get_args(SpliceMode)


class CEResult(NamedTuple):
    """Cross-entropy of one splicing condition."""

    ce: float
    """Mean next-token cross-entropy (nats) with the splice."""
    delta_ce: float
    """``ce − ce_clean``."""
    kl: float
    """Mean KL(p_clean ‖ p_spliced) per token (nats)."""
    ce_ablate: float
    """Cross-entropy with the same layers mean-ablated."""
    ce_recovered: float | None
    """``(ce_ablate − ce) / (ce_ablate − ce_clean)``; None when ablation changes nothing."""


class SpliceReport(NamedTuple):
    """Splicing results of one dictionary."""

    ce_clean: float
    """Cross-entropy of the unmodified model on the scored tokens."""
    single: dict[int, CEResult]
    """Each layer replaced alone (teacher-forced and online coincide)."""
    joint: dict[str, CEResult]
    """All layers replaced at once, per mode (:data:`SPLICE_MODES`)."""
    interaction: dict[str, float]
    """``ΔCE_joint − Σ ΔCE_single`` per mode."""
    n_tokens: int
    """Scored next-token predictions."""
    local: dict[int, CEResult]
    """Each residual layer replaced alone by its local reconstruction (resae mode; empty for
    a layerwise dictionary, whose single splices are already local)."""


class _OnlineChain:
    """Hooks for one online pass: encode what the stream holds, replace the chosen layers."""

    def __init__(self, resae: ReSAE, keep: torch.Tensor, splice: Collection[int]) -> None:
        self.resae, self.keep, self.splice = resae, keep, set(splice)
        self.stream_prev: torch.Tensor | None = None
        self.x_hat_prev: torch.Tensor | None = None

    def hooks(self) -> dict[int, BlockFn]:
        last = max(self.resae.index(layer) for layer in self.splice)
        return {self.resae.layers[i]: self._hook(i) for i in range(last + 1)}

    def _hook(self, i: int) -> BlockFn:
        layer = self.resae.layers[i]

        def fn(hidden: torch.Tensor) -> torch.Tensor | None:
            h = hidden[self.keep].float()
            step = chain_step(self.resae, i, h, self.stream_prev, self.x_hat_prev)
            self.x_hat_prev = step.x_hat
            if layer in self.splice:
                self.stream_prev = step.x_hat
                return replace_at(hidden, self.keep, step.x_hat)
            self.stream_prev = h
            return None

        return fn


def online_hooks(resae: ReSAE, keep: torch.Tensor, splice: Collection[int]) -> dict[int, BlockFn]:
    """Hooks of one online pass that replaces the layers in ``splice`` at ``keep (B, T)``."""
    return _OnlineChain(inference_resae(resae), keep, splice).hooks()


def error_preserving_hooks(resae: ReSAE, keep: torch.Tensor, tables: Mapping[int, EditTable],
                           ) -> dict[int, BlockFn]:
    """Hooks that splice ``x̂' + (x − x̂) = h + δ`` with per-token edit tables by layer.

    ``δ`` is :meth:`ReSAE.intervention_delta`, computed on the stream as it arrives (edits
    upstream included); with no edits the model is unchanged exactly. Tables hold one row per
    kept position.
    """
    if not tables:
        return {}
    last = max(resae.index(layer) for layer in tables)
    state: dict[str, torch.Tensor] = {}

    def make(layer: int) -> BlockFn:
        def fn(hidden: torch.Tensor) -> torch.Tensor | None:
            h = hidden[keep].float()
            prev = state.get("prev")
            state["prev"] = h
            if layer not in tables:
                return None
            new = h + resae.intervention_delta(layer, h, prev, tables[layer])
            state["prev"] = new
            return replace_at(hidden, keep, new)
        return fn

    return {resae.layers[i]: make(resae.layers[i]) for i in range(last + 1)}


class _Sums:
    """Pooled CE and KL sums per condition."""

    def __init__(self) -> None:
        self.ce: defaultdict[object, float] = defaultdict(float)
        self.kl: defaultdict[object, float] = defaultdict(float)
        self.n = 0

    def mean_ce(self, key: object) -> float:
        return self.ce[key] / self.n

    def mean_kl(self, key: object) -> float:
        return self.kl[key] / self.n


class _Scored(NamedTuple):
    """One batch of windows with its clean predictions."""

    ids: torch.Tensor
    attn: torch.Tensor
    score: torch.Tensor
    targets: torch.Tensor
    lp_clean: torch.Tensor
    p_clean: torch.Tensor


def _run(model: nn.Module, batch: _Scored, sums: _Sums, key: object,
         fns: Mapping[int, BlockFn]) -> None:
    """One spliced pass; adds its CE and KL to ``sums[key]``."""
    lp = _scored(forward_logits(model, batch.ids, batch.attn, fns), batch.score)
    sums.ce[key] += float(-lp.gather(1, batch.targets[:, None]).sum())
    sums.kl[key] += float((batch.p_clean * (batch.lp_clean - lp)).sum())


def _scored(logits: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``(n, V)`` of the predictions at the scored positions."""
    return F.log_softmax(logits[:, :-1][score].float(), dim=-1)


@torch.no_grad()
def evaluate_splicing(
    model: nn.Module, windows: Iterable[TokenWindows], dictionaries: Mapping[str, ReSAE],
    means: Mapping[int, torch.Tensor], *, modes: Collection[str] = SPLICE_MODES,
    progress: bool = True,
) -> dict[str, SpliceReport]:
    """Splice every dictionary into the model over ``windows``; results by dictionary name.

    ``means``: the mean activation ``(d,)`` of every dictionary layer (mean ablation).
    """
    bad = sorted(set(modes) - set(SPLICE_MODES))
    if bad:
        raise ValueError(f"modes={bad}; allowed: {', '.join(SPLICE_MODES)}")
    dicts = {name: inference_resae(resae) for name, resae in dictionaries.items()}
    union = sorted({layer for resae in dicts.values() for layer in resae.layers})
    missing = [layer for layer in union if layer not in means]
    if missing:
        raise ValueError(f"no mean activation for layers {missing} (needed for mean ablation)")
    device = next(model.parameters()).device
    sums = _Sums()
    for win in tqdm(windows, desc="splice", unit="batch", disable=not progress,
                    dynamic_ncols=True):
        ids, attn = win.input_ids.to(device), win.attention_mask.to(device)
        keep = win.keep.to(device)
        score = keep[:, :-1] & attn[:, 1:].bool()
        if not bool(score.any()):
            continue
        clean: dict[int, torch.Tensor] = {}
        lp_clean = _scored(forward_logits(model, ids, attn, {
            layer: recorder(clean, layer) for layer in union}), score)
        batch = _Scored(ids, attn, score, ids[:, 1:][score], lp_clean, lp_clean.exp())
        sums.n += len(batch.targets)
        sums.ce["clean"] += float(-lp_clean.gather(1, batch.targets[:, None]).sum())
        run = functools.partial(_run, model, batch, sums)
        ablations = {(layer,) for layer in union} | {resae.layers for resae in dicts.values()}
        for layers in sorted(ablations):
            run(("ablate", layers), {layer: constant_at(keep, means[layer].to(device))
                                     for layer in layers})
        for name, resae in dicts.items():
            acts = [clean[layer][keep].float() for layer in resae.layers]
            steps = teacher_forced(resae, acts)
            fixed = {layer: constant_at(keep, step.x_hat)
                     for layer, step in zip(resae.layers, steps, strict=True)}
            local = [local_reconstruction(resae, i, step, acts[i - 1] if i else None)
                     for i, step in enumerate(steps)]
            for i, layer in enumerate(resae.layers):
                run((name, "single", layer), {layer: fixed[layer]})
                if local[i] is not steps[i].x_hat:
                    run((name, "local", layer), {layer: constant_at(keep, local[i])})
            if "teacher_forced" in modes:
                run((name, "joint", "teacher_forced"), fixed)
            if "teacher_forced_additive" in modes:
                run((name, "joint", "teacher_forced_additive"),
                    {layer: added_at(keep, x_hat - h)
                     for layer, x_hat, h in zip(resae.layers, local, acts, strict=True)})
            if "online" in modes:
                run((name, "joint", "online"), online_hooks(resae, keep, resae.layers))
    if sums.n == 0:
        raise ValueError("no scored tokens: the windows hold no next-token predictions")
    return {name: _report(name, resae, modes, sums) for name, resae in dicts.items()}


def _report(name: str, resae: ReSAE, modes: Collection[str], sums: _Sums) -> SpliceReport:
    ce_clean = sums.mean_ce("clean")

    def result(key: object, ablate: tuple[int, ...]) -> CEResult:
        ce, ce_ablate = sums.mean_ce(key), sums.mean_ce(("ablate", ablate))
        gap = ce_ablate - ce_clean
        recovered = (ce_ablate - ce) / gap if abs(gap) > 1e-9 else None
        return CEResult(ce, ce - ce_clean, sums.mean_kl(key), ce_ablate, recovered)

    single = {layer: result((name, "single", layer), (layer,)) for layer in resae.layers}
    local = {layer: result((name, "local", layer), (layer,)) for layer in resae.layers
             if (name, "local", layer) in sums.ce}
    joint = {mode: result((name, "joint", mode), resae.layers)
             for mode in SPLICE_MODES if mode in modes}
    total = sum(r.delta_ce for r in single.values())
    interaction = {mode: r.delta_ce - total for mode, r in joint.items()}
    for mode, r in joint.items():
        logger.info("%s joint %s: dCE %.4f, KL %.4f, interaction %.4f", name, mode, r.delta_ce,
                    r.kl, interaction[mode])
    return SpliceReport(ce_clean, single, joint, interaction, sums.n, local)
