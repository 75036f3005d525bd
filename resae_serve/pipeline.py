"""End to end: model + corpus → captured activations → calibration → SAE training → artifact.

This is the only training module that knows about language models; it feeds the trainer
plain tensors. Captured activations are cached as shards keyed by everything that determines
them (model fingerprint, corpus, split, layers, window settings, dtype, seed), so a second
run, the other mode, or a resumed run reads them from disk instead of running the model again.
Capture, calibration, training and evaluation all run on ``TrainConfig.device``; the cache
is shared between devices (the device is not part of its key).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from resae_serve.affine import AffineFit, AffineStats, ScaleStats, fit_affine
from resae_serve.artifact import ModelIdentity, read_manifest, save_artifact
from resae_serve.cache import atomic_folder, cache_dir
from resae_serve.capture import DTYPES, CaptureConfig, capture_activations
from resae_serve.context import TrainingContext, median_norms
from resae_serve.corpus import Split, load_documents
from resae_serve.errors import ResaeError
from resae_serve.fingerprint import model_fingerprint
from resae_serve.metrics import ReconstructionStats
from resae_serve.models import load_model, resolve_model
from resae_serve.resae import ReSAE
from resae_serve.shards import INDEX_FILE, read_index, read_shards, write_shards
from resae_serve.train import (
    ReSAETrainer,
    TrainConfig,
    TrainError,
    rebatch,
    resae_inputs,
    resolve_device,
    settings_diff,
)

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".checkpoint.pt"


@dataclass(frozen=True)
class DataConfig:
    """Where the activations come from."""

    model: str = "smollm2-135m"
    """Embedded model name or local Hugging Face folder."""
    corpus: str = "brown"
    """Named corpus or local path (training and calibration use its train split)."""
    context_size: int = 256
    """Tokens per capture window."""
    capture_batch_size: int = 8
    """Windows per forward pass."""
    calibration_tokens: int = 50_000
    """Tokens for the affine fit and scales (90 % fit, 10 % λ selection), before training."""
    eval_tokens: int = 20_000
    """Held-out tokens (the corpus' held-out split) for the final metrics."""
    shuffle_buffer: int = 65_536
    """Tokens mixed together when the training stream is captured."""
    dtype: str = "auto"
    """Dtype activations are captured, cached and fed to the device in: ``float32``,
    ``bfloat16``, ``float16``, or ``auto`` (bfloat16 on CUDA, float32 on CPU). The SAEs
    themselves train in float32 whatever it is."""
    outlier_norm_ratio: float | None = 10.0
    """Drop tokens with massive norms (see :class:`~resae_serve.capture.CaptureConfig`)."""

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise TrainError(f"dtype={self.dtype!r}; allowed: auto, {', '.join(DTYPES)}")


def activation_dtype(dtype: str, device: torch.device) -> str:
    """``dtype`` with ``auto`` resolved: bfloat16 on CUDA, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def cached_activations(
    data: DataConfig, layers: tuple[int, ...], split: Split, n_tokens: int, *, seed: int,
    shuffle: bool, progress: bool = True, device: torch.device | str = "cpu",
) -> Path:
    """Shard folder with at least ``n_tokens`` activations; captured once (the model runs on
    ``device``), then reused."""
    device = torch.device(device)
    dtype = activation_dtype(data.dtype, device)
    model_dir = resolve_model(data.model)
    key = {
        "model": model_fingerprint(model_dir), "corpus": str(data.corpus), "split": split,
        "layers": list(layers), "context_size": data.context_size, "dtype": dtype,
        "shuffle_buffer": data.shuffle_buffer if shuffle else 0, "seed": seed,
        "outlier_norm_ratio": data.outlier_norm_ratio,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_dir("activations") / digest
    if (folder / INDEX_FILE).is_file() and read_index(folder)["n_tokens"] >= n_tokens:
        logger.info("reusing %s activations in %s", split, folder)
        return folder
    model, tokenizer = load_model(model_dir, device=str(device))
    config = CaptureConfig(
        layers=layers, context_size=data.context_size, batch_size=data.capture_batch_size,
        dtype=dtype, max_tokens=n_tokens,  # type: ignore[arg-type]
        shuffle_buffer=data.shuffle_buffer if shuffle else 0, seed=seed, progress=progress,
        outlier_norm_ratio=data.outlier_norm_ratio,
    )
    stream = capture_activations(model, tokenizer, load_documents(data.corpus, split), config)
    with atomic_folder(folder) as tmp:
        write_shards(stream, tmp, layers=layers, metadata=key)
    return folder


def _acts(folder: Path) -> Iterator[torch.Tensor]:
    """The cached activations in their storage dtype (consumers cast on their device)."""
    return (batch.acts for batch in read_shards(folder))


@dataclass(frozen=True)
class Calibration:
    """Scales and affine maps fitted before SAE training."""

    scales: list[float]
    affine: list[tuple[torch.Tensor, torch.Tensor] | None] | None
    fits: list[dict[str, Any]]
    init_sample: torch.Tensor
    reference_norms: tuple[float, ...] = ()
    """Median token norm per layer on the calibration tokens (the serving outlier rule's
    reference, :mod:`resae_serve.context`)."""


def calibrate(config: TrainConfig, stream: Iterator[torch.Tensor], n_tokens: int, *,
              device: torch.device | str = "cpu") -> Calibration:
    """Fit the affine chain and scales on the first ``n_tokens`` of ``stream``, on ``device``
    (statistics in float64 there)."""
    n_fit = int(n_tokens * 0.9)
    n_layers = len(config.layers)
    scale_stats = [ScaleStats() for _ in range(n_layers)]
    fit_stats: list[AffineStats] = []
    held_stats: list[AffineStats] = []
    seen = 0
    sample: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []                                     # (n, n_layers) each
    for acts in rebatch(stream, 4096):
        if seen >= n_tokens:
            break
        acts = acts[: n_tokens - seen].to(device).float()
        if not fit_stats:
            d = acts.shape[-1]
            fit_stats = [AffineStats(d, d, device) for _ in range(n_layers)]
            held_stats = [AffineStats(d, d, device) for _ in range(n_layers)]
        if len(sample) < 2:
            sample.append(acts)
        norms.append(acts.norm(dim=-1).cpu())
        fit_part, held_part = acts[: max(n_fit - seen, 0)], acts[max(n_fit - seen, 0):]
        for i in range(n_layers):
            scale_stats[i].update(acts[:, i])
            if i:
                for stats, part in ((fit_stats[i], fit_part), (held_stats[i], held_part)):
                    if len(part):
                        stats.update(part[:, i - 1], part[:, i])
        seen += len(acts)
    if seen < n_tokens:
        raise ValueError(f"calibration needs {n_tokens} tokens; the stream gave {seen}")
    rms = [s.rms for s in scale_stats]
    reference = median_norms(torch.cat(norms))
    if config.mode == "layerwise":
        return Calibration(rms, None, [], torch.cat(sample), reference)
    fits: list[AffineFit] = [fit_affine(fit_stats[i], held_stats[i]) for i in range(1, n_layers)]
    scales = [rms[0]] + [fit.sigma for fit in fits]
    affine: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]
    affine += [(fit.A, fit.c) for fit in fits]
    summary = [{"layer": config.layers[i], "from_layer": config.layers[i - 1], "r2": fit.r2,
                "sigma": fit.sigma, "lambda": fit.lam} for i, fit in enumerate(fits, start=1)]
    for row in summary:
        logger.info("affine %d -> %d: R2 %.4f, sigma %.3f, lambda %.3g", row["from_layer"],
                    row["layer"], row["r2"], row["sigma"], row["lambda"])
    return Calibration(scales, affine, summary, torch.cat(sample), reference)


@torch.no_grad()
def evaluate_reconstruction(resae: ReSAE, stream: Iterator[torch.Tensor]) -> dict[int, dict[
    str, float
]]:
    """Held-out metrics per layer: activation-space (through the chain) and SAE-input space."""
    act_stats = [ReconstructionStats(sae.config.d_sae) for sae in resae.saes]
    input_stats = [ReconstructionStats(sae.config.d_sae) for sae in resae.saes]
    saes = [sae.inference_sae() for sae in resae.saes]
    device = resae.scales.device
    for acts in rebatch(stream, 4096):
        acts = acts.to(device).float()
        inputs = resae_inputs(resae, acts)
        dense = [sae.encode(u) for sae, u in zip(saes, inputs, strict=True)]
        recon = resae.decode(dict(zip(resae.layers, dense, strict=True)))
        for i, layer in enumerate(resae.layers):
            active = dense[i] > 0
            act_stats[i].update(acts[:, i], recon[layer], active)
            input_stats[i].update(inputs[i], saes[i].decode(dense[i]), active)
    out = {}
    for i, layer in enumerate(resae.layers):
        row = act_stats[i].summary()
        row["input_fve"] = input_stats[i].fve
        out[layer] = row
    return out


def train_dictionary(
    data: DataConfig, config: TrainConfig, out: Path, *, progress: bool = True,
) -> dict[str, Any]:
    """Capture (or reuse), calibrate, train, evaluate and save; returns the summary."""
    from resae_serve.curves import plot_history

    device = resolve_device(config.device)
    data = replace(data, dtype=activation_dtype(data.dtype, device))
    total = data.calibration_tokens + config.tokens
    train_dir = cached_activations(data, config.layers, "train", total, seed=config.seed,
                                   shuffle=True, progress=progress, device=device)
    calibration = calibrate(config, _acts(train_dir), data.calibration_tokens, device=device)
    checkpoint = out.with_name(out.name + CHECKPOINT_SUFFIX)
    d_model = calibration.init_sample.shape[-1]
    trainer = ReSAETrainer.create(config, d_model=d_model, scales=calibration.scales,
                                  affine=calibration.affine, init_sample=calibration.init_sample)
    if checkpoint.is_file():
        trainer = ReSAETrainer.load_checkpoint(checkpoint, config, trainer.resae)
    batches = rebatch(_acts(train_dir), config.batch_size,
                      skip=data.calibration_tokens + trainer.tokens_seen)
    trainer.fit(batches, checkpoint=checkpoint, progress=progress)

    eval_dir = cached_activations(data, config.layers, "heldout", data.eval_tokens,
                                  seed=config.seed, shuffle=False, progress=progress,
                                  device=device)
    metrics = evaluate_reconstruction(trainer.resae, _acts(eval_dir))
    resae = trainer.resae.cpu()
    model_dir = resolve_model(data.model)
    model_config = json.loads((model_dir / "config.json").read_text())
    identity = ModelIdentity(
        name=data.model, fingerprint=model_fingerprint(model_dir),
        model_type=model_config.get("model_type", "unknown"),
        n_layers=int(model_config.get("num_hidden_layers", model_config.get("n_layer", 0))),
        d_model=d_model,
    )
    summary = {"train_config": asdict(config), "data_config": asdict(data),
               "device": str(device), "tokens_seen": trainer.tokens_seen,
               "steps": trainer.step, "eval": {str(k): v for k, v in metrics.items()}}
    # as cached_activations captures (CaptureConfig's defaults: BOS first, its position dropped)
    capture_defaults = CaptureConfig(layers=config.layers)
    context = TrainingContext(capture_defaults.prepend_bos, capture_defaults.skip_bos,
                              data.outlier_norm_ratio, calibration.reference_norms)
    save_artifact(resae, out, identity, affine_summary=calibration.fits, training=summary,
                  context=context)
    (out / "training_history.json").write_text(json.dumps(trainer.history) + "\n")
    plot_history(trainer.history, config.layers, out / "training_curves.png",
                 title=f"{config.mode} · {config.architecture} k={config.k} · {data.model}")
    checkpoint.unlink(missing_ok=True)
    return summary


def existing_summary(out: Path, data: DataConfig, train: TrainConfig) -> dict[str, Any] | None:
    """The training summary of a dictionary already in ``out`` with the same settings.

    Where it was trained does not count (``device``, and ``dtype`` left at ``auto``): a
    dictionary trained on a GPU is found done by the same command on a CPU host.
    """
    if not (out / "manifest.json").is_file():
        return None
    summary: dict[str, Any] = read_manifest(out).training
    wanted = json.loads(json.dumps({"train_config": asdict(train), "data_config": asdict(data)}))
    diff = {}
    for key, config_class in (("train_config", TrainConfig), ("data_config", DataConfig)):
        stored = summary.get(key)
        if not isinstance(stored, dict):
            raise ResaeError(f"{out} holds a dictionary without a {key} in its manifest; "
                             "choose another --out or pass --force to replace it")
        diff.update(settings_diff(stored, wanted[key], config_class))
    if diff:
        changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(diff.items()))
        raise ResaeError(f"{out} holds a dictionary trained with other settings ({changes}); "
                         "choose another --out or pass --force to replace it")
    logger.info("%s already holds a dictionary with these settings (--force retrains)", out)
    return summary


def check_sae_settings(data: DataConfig, train: TrainConfig) -> None:
    """Refuse SAE settings the model's width rules out (e.g. ``k`` above ``d_sae``, ``lr``
    0) before anything is captured, rather than after capture and calibration."""
    from transformers import AutoConfig

    d_model = getattr(AutoConfig.from_pretrained(resolve_model(data.model)), "hidden_size", None)
    if not isinstance(d_model, int):
        return  # an unusual config: the trainer checks once activations give the width
    try:
        train.sae_config(d_model)
    except ValueError as exc:  # SAEConfig states the field, value and what is allowed
        raise TrainError(f"{exc} (d_model={d_model} for model {data.model})") from exc
