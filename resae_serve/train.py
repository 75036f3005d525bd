"""Train the SAEs of a (Re)SAE in one pass over a stream of activations.

The trainer knows nothing about language models: it takes an iterator of ``(N, n_layers, d)``
activation tensors (layers in ascending order) plus the calibration it needs (scales and, in
``resae`` mode, the affine maps) and trains one SAE per layer side by side, each on
``h_0 / s_0`` or ``(h_m − A_m h_{m−1} − c_m) / σ_m`` (``h_m / s_m`` in ``layerwise`` mode).
Every layer sees the same tokens in the same order. Deterministic under a seed; a checkpoint
holds everything needed to resume bit-for-bit.

Training runs on ``TrainConfig.device``: the SAEs, Adam's state and the dead-latent counters
live there, batches arrive from pinned memory without blocking, the SAE step runs under
bfloat16 autocast on CUDA (parameters and Adam state stay float32; the SAE inputs, which
subtract the affine prediction, are formed in float32 outside it), and metrics stay device
tensors except on logging steps, so that a step does not wait for the device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from resae_serve.errors import ResaeError
from resae_serve.metrics import batch_fve
from resae_serve.resae import MODES, Mode, ReSAE
from resae_serve.saes import SAE, SAEConfig, build_sae

logger = logging.getLogger(__name__)


class TrainError(ResaeError):
    """Training was configured with values it cannot use."""


LEGACY_DEFAULTS: dict[str, Any] = {"encoder_init_scale": 1.0}
"""Values in effect for settings written before the field existed (when not its default)."""

RUNTIME_FIELDS: tuple[str, ...] = ("device",)
"""TrainConfig fields that say where a run happens, not what it learns: ignored when a
checkpoint or a finished dictionary is compared with the settings of a new run, so a run
started on a GPU can be resumed (or found done) on a CPU and the other way round."""

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise TrainError(f"device={device!r}; allowed: auto, cpu, cuda, cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device={device!r} but CUDA is not available here (torch "
                             f"{torch.__version__}); use device='cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise TrainError(f"device={device!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return resolved


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of SAE training (shared by every layer)."""

    layers: tuple[int, ...]
    """Model block indices, strictly increasing."""
    mode: Mode = "resae"
    """``resae`` (residualized chain) or ``layerwise`` (independent SAEs on raw activations)."""
    architecture: str = "topk"
    """SAE architecture (registry key): topk, batchtopk, relu."""
    expansion: int = 8
    """d_sae = expansion × d_model, unless ``d_sae`` is given."""
    d_sae: int | None = None
    """Number of latents per layer (overrides ``expansion``)."""
    k: int = 32
    """Active latents per token (topk / batchtopk)."""
    tokens: int = 500_000
    """Training tokens (after calibration)."""
    batch_size: int = 1024
    """Tokens per optimiser step."""
    lr: float | None = None
    """Adam learning rate; None scales 2e-4 / sqrt(d_sae / 2**14) (Gao et al. 2024)."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up."""
    decay_fraction: float = 0.2
    """Linear decay to zero over this final fraction of steps."""
    dead_after_tokens: int = 100_000
    """A latent that has not fired for this many tokens counts as dead (AuxK revives it)."""
    l1_coefficient: float = 5.0
    """ReLU SAEs only."""
    seed: int = 0
    """Seeds the SAE initialisation."""
    encoder_init_scale: float = 0.5
    """``W_enc`` starts as this times ``W_dec.T`` (Gao et al. use 1). A smaller encoder learns
    faster under Adam: on SmolLM2 layer 12 (576 → 4,608, k 32, batch 1,024, default learning
    rate) held-out FVE after 480 steps was 0.719 at 1, 0.738 at 0.7, 0.743 at 0.5 and 0.739
    at 0.25; after 60 steps at lr 2e-3, 0.684 at 1 and 0.711 at 0.5."""
    log_every: int = 10
    """Steps between history records."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: never)."""
    device: str = "auto"
    """Where to train: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
    A runtime setting (see :data:`RUNTIME_FIELDS`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise TrainError(f"device={self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        if self.mode not in MODES:
            raise TrainError(f"mode={self.mode!r}; allowed: {', '.join(MODES)}")
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise TrainError(f"layers={list(self.layers)}; need strictly increasing indices")
        for name in ("expansion", "k", "tokens", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name}={getattr(self, name)}; must be at least 1")
        if not 0 <= self.decay_fraction < 1:
            raise TrainError(f"decay_fraction={self.decay_fraction}; must be in [0, 1)")
        if not (math.isfinite(self.encoder_init_scale) and self.encoder_init_scale > 0):
            raise TrainError(f"encoder_init_scale={self.encoder_init_scale}; must be a finite "
                             "number > 0")

    def sae_config(self, d_model: int) -> SAEConfig:
        """The per-layer SAE config for a model of width ``d_model``."""
        return SAEConfig(architecture=self.architecture,  # type: ignore[arg-type]
                         d_in=d_model,
                         d_sae=self.d_sae or self.expansion * d_model, k=self.k,
                         dead_after_tokens=self.dead_after_tokens,
                         l1_coefficient=self.l1_coefficient, lr=self.lr)

    @property
    def n_steps(self) -> int:
        """Optimiser steps in the whole run."""
        return math.ceil(self.tokens / self.batch_size)


def rebatch(stream: Iterable[torch.Tensor], batch_size: int, *, skip: int = 0) -> Iterator[
    torch.Tensor
]:
    """Re-cut a stream of ``(n, ...)`` tensors into ``batch_size`` rows, skipping ``skip`` rows."""
    pending: list[torch.Tensor] = []
    held = 0
    for chunk in stream:
        if skip:
            dropped = min(skip, len(chunk))
            chunk, skip = chunk[dropped:], skip - dropped
        if not len(chunk):
            continue
        pending.append(chunk)
        held += len(chunk)
        while held >= batch_size:
            merged = torch.cat(pending)
            yield merged[:batch_size]
            rest = merged[batch_size:]
            pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if held:
        yield torch.cat(pending)


class ReSAETrainer:
    """Owns the SAEs, the optimiser, the dead-latent counters and the history."""

    def __init__(self, config: TrainConfig, resae: ReSAE) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.resae = resae.to(self.device)
        lr = resae.saes[0].config.effective_lr()
        params = [p for p in resae.sae_modules.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
        self.base_lr = lr
        self.step = 0
        self.tokens_seen = 0
        self.since_fired = [torch.zeros(sae.config.d_sae, dtype=torch.long, device=self.device)
                            for sae in resae.saes]
        self.history: list[dict[str, Any]] = []

    @classmethod
    def create(
        cls, config: TrainConfig, *, d_model: int, scales: list[float],
        affine: list[tuple[torch.Tensor, torch.Tensor] | None] | None,
        init_sample: torch.Tensor,
    ) -> ReSAETrainer:
        """Build fresh SAEs (seeded) and initialise ``b_dec`` from ``init_sample (N, L, d)``."""
        device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        saes = [build_sae(config.sae_config(d_model), device=device) for _ in config.layers]
        resae = ReSAE(config.layers, saes, scales, mode=config.mode, affine=affine).to(device)
        inputs = resae_inputs(resae, init_sample.to(device).float())
        with torch.no_grad():
            for sae, u in zip(saes, inputs, strict=True):
                sae.init_from_data(u, encoder_scale=config.encoder_init_scale)
        return cls(config, resae)

    def lr_at(self, step: int) -> float:
        """Warm-up, constant, then linear decay to zero."""
        n = self.config.n_steps
        warm = min(1.0, (step + 1) / max(self.config.warmup_steps, 1))
        decay_start = n * (1 - self.config.decay_fraction)
        decay = 1.0 if step < decay_start else max(0.0, (n - step) / max(n - decay_start, 1))
        return self.base_lr * warm * decay

    def train_step(self, acts: torch.Tensor, *, log: bool = True) -> dict[str, Any]:
        """One optimiser step on ``acts (B, L, d)`` (any float dtype, any device).

        Returns ``step`` and ``tokens``, plus per-layer ``loss``, ``fve``, ``l0`` and ``dead``
        as floats when ``log`` (which waits for the device; :meth:`fit` logs every
        ``log_every`` steps only).
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        acts = self._to_device(acts)
        inputs = resae_inputs(self.resae, acts)
        dead = [since >= sae.config.dead_after_tokens
                for since, sae in zip(self.since_fired, self.resae.saes, strict=True)]
        n_dead = self._count(dead)
        with self._autocast():
            outs = [sae.training_step(u, mask, n_dead=n) for sae, u, mask, n in
                    zip(self.resae.saes, inputs, dead, n_dead, strict=True)]
        total = torch.stack([out.loss for out in outs]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        for sae in self.resae.saes:
            sae.remove_parallel_grad()
        self.optimizer.step()
        for sae in self.resae.saes:
            sae.normalize_decoder()
        for since, out in zip(self.since_fired, outs, strict=True):
            since.add_(len(acts)).masked_fill_(out.fired, 0)
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens_seen + len(acts)}
        if log:
            for layer, u, out, mask in zip(self.resae.layers, inputs, outs, dead, strict=True):
                record[f"loss/{layer}"] = float(out.loss.detach())
                record[f"fve/{layer}"] = batch_fve(u.detach(), out.x_hat.detach())
                record[f"l0/{layer}"] = float(out.metrics.get("l0", float("nan")))
                record[f"dead/{layer}"] = float(mask.float().mean())
        self.step += 1
        self.tokens_seen += len(acts)
        return record

    def _to_device(self, acts: torch.Tensor) -> torch.Tensor:
        """Float32 on the training device; from pinned memory without blocking on CUDA."""
        if self.device.type == "cuda" and not acts.is_cuda:
            acts = acts.pin_memory()
        return acts.to(self.device, non_blocking=True).float()

    def _count(self, dead: list[torch.Tensor]) -> list[int]:
        """Dead latents per layer: none before ``dead_after_tokens`` tokens, else one sync."""
        if all(self.tokens_seen < sae.config.dead_after_tokens for sae in self.resae.saes):
            return [0] * len(dead)
        counts: list[int] = torch.stack([mask.sum() for mask in dead]).tolist()
        return counts

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 autocast of the SAE step on CUDA (where supported), nothing on CPU."""
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fit(self, batches: Iterable[torch.Tensor], *, checkpoint: Path | None = None,
            progress: bool = True) -> None:
        """Train until ``config.tokens`` tokens were seen (resumes from ``tokens_seen``)."""
        config = self.config
        bar = tqdm(total=config.tokens, initial=self.tokens_seen, unit="tok", unit_scale=True,
                   desc=f"train {config.mode}", disable=not progress, dynamic_ncols=True)
        with bar:
            for acts in batches:
                if self.tokens_seen >= config.tokens:
                    break
                acts = acts[: config.tokens - self.tokens_seen]
                log = ((self.step + 1) % config.log_every == 0
                       or self.tokens_seen + len(acts) >= config.tokens)
                record = self.train_step(acts, log=log)
                bar.update(len(acts))
                if log:
                    self.history.append(record)
                    bar.set_postfix(_postfix(record, self.resae.layers))
                every = config.checkpoint_every
                if checkpoint and every and self.step % every == 0:
                    self.save_checkpoint(checkpoint)
        if self.tokens_seen < config.tokens:
            logger.warning("stream ended after %d of %d training tokens",
                           self.tokens_seen, config.tokens)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: Path) -> None:
        """Everything needed to resume, written atomically."""
        state = {
            "config": asdict(self.config),
            "resae": self.resae.state_dict(),
            "sae_configs": [sae.config.to_dict() for sae in self.resae.saes],
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "since_fired": self.since_fired,
            "history": self.history,
            "scales": self.resae.scales.tolist(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    @classmethod
    def load_checkpoint(cls, path: Path, config: TrainConfig, resae: ReSAE) -> ReSAETrainer:
        """Restore a trainer saved by :meth:`save_checkpoint` into a freshly built ``resae``."""
        device = resolve_device(config.device)
        state = torch.load(path, map_location=device, weights_only=False)
        diff = settings_diff(state["config"], asdict(config), TrainConfig)
        if diff:
            raise TrainError(f"checkpoint {path} was written with other settings {diff}; "
                             "delete it or rerun with the same settings")
        resae.load_state_dict(state["resae"])
        trainer = cls(config, resae)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
        trainer.since_fired, trainer.history = state["since_fired"], state["history"]
        logger.info("resumed from %s at step %d (%d tokens)", path, trainer.step,
                    trainer.tokens_seen)
        return trainer


def settings_diff(stored: dict[str, Any], wanted: dict[str, Any],
                  config_class: type) -> dict[str, tuple[Any, Any]]:
    """``{field: (stored, wanted)}`` where two config dicts disagree.

    Runtime fields (:data:`RUNTIME_FIELDS`) are ignored, a field missing from ``stored``
    (written before it existed) counts as the value then in effect (:data:`LEGACY_DEFAULTS`,
    else its default), and a wanted ``"auto"`` matches whatever the stored run resolved it to.
    """
    defaults = {f.name: LEGACY_DEFAULTS.get(f.name, f.default) for f in fields(config_class)}
    diff = {}
    for key, value in wanted.items():
        if key in RUNTIME_FIELDS or value == "auto":
            continue
        old = stored.get(key, defaults.get(key))
        if old != value:
            diff[key] = (old, value)
    diff.update({key: (value, None) for key, value in stored.items()
                 if key not in wanted and key not in RUNTIME_FIELDS})
    return diff


def resae_inputs(resae: ReSAE, acts: torch.Tensor) -> list[torch.Tensor]:
    """Normalised SAE inputs of every layer from stacked activations ``(N, L, d)``."""
    return [resae.sae_input(i, acts[:, i], acts[:, i - 1] if i else None)
            for i in range(len(resae.layers))]


def _postfix(record: dict[str, Any], layers: tuple[int, ...]) -> dict[str, str]:
    def mean(key: str) -> float:
        return sum(record[f"{key}/{layer}"] for layer in layers) / len(layers)
    return {"loss": f"{mean('loss'):.3f}", "fve": f"{mean('fve'):.3f}",
            "L0": f"{mean('l0'):.1f}", "dead": f"{mean('dead'):.1%}"}


def inference_saes(resae: ReSAE) -> list[SAE]:
    """The SAEs as saved for inference (BatchTopK becomes JumpReLU)."""
    return [sae.inference_sae() for sae in resae.saes]
