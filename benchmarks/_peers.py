"""TopK SAE trainers of this project and of its peers behind one small interface.

Each adapter owns one SAE and its Adam optimiser and exposes ``step(x, lr)`` (one optimiser
step on a batch ``(B, d_in)``) and ``reconstruct(x)``; ``benchmarks/train.py --peer`` drives
them side by side on the same activations. The peers are the real packages (``eai-sparsify``,
``sae-lens``; the ``interop`` extra), used as their own trainers use them: sparsify's FVU loss
with its fused encoder and AuxK, SAELens' ``training_forward_pass``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from resae_serve.train import ReSAETrainer, TrainConfig


@dataclass(frozen=True)
class PeerSettings:
    """What every trainer in the comparison shares."""

    d_in: int
    d_sae: int
    k: int
    lr: float
    steps: int
    batch_size: int
    device: str
    warmup_steps: int = 0
    decay_fraction: float = 0.0
    dead_after_tokens: int = 100_000
    aux_coefficient: float = 1 / 32


class PeerTrainer(Protocol):
    """One SAE under training."""

    name: str

    def step(self, x: Tensor, lr: float) -> None:
        """One optimiser step on ``x`` (B, d_in) at learning rate ``lr``."""

    def reconstruct(self, x: Tensor) -> Tensor:
        """(N, d_in) -> (N, d_in) reconstruction, no gradient."""


class ResaeTopK:
    """This project's TopK SAE through its own trainer (one layer, layerwise, scale 1)."""

    name = "resae-serve TopKSAE"

    def __init__(self, settings: PeerSettings, sample: Tensor, seed: int) -> None:
        self.config = TrainConfig(
            layers=(0,), mode="layerwise", d_sae=settings.d_sae, k=settings.k,
            tokens=settings.steps * settings.batch_size, batch_size=settings.batch_size,
            lr=settings.lr, warmup_steps=settings.warmup_steps,
            decay_fraction=settings.decay_fraction,
            dead_after_tokens=settings.dead_after_tokens, seed=seed, log_every=10**9,
            checkpoint_every=0, device=settings.device)
        self.trainer = ReSAETrainer.create(self.config, d_model=settings.d_in, scales=[1.0],
                                           affine=None, init_sample=sample[:, None])

    def lr_at(self, step: int) -> float:
        """The learning-rate schedule of this project's trainer, used for every peer."""
        return self.trainer.lr_at(step)

    def step(self, x: Tensor, lr: float) -> None:
        del lr  # the trainer follows its own schedule, lr_at(step), which the driver passes
        self.trainer.train_step(x[:, None], log=False)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        sae = self.trainer.resae.saes[0]
        return sae(x.to(sae.W_dec.device, sae.W_dec.dtype))


class SparsifyTopK:
    """EleutherAI sparsify's ``SparseCoder`` as its trainer drives it (FVU + AuxK loss)."""

    name = "sparsify SparseCoder"

    def __init__(self, settings: PeerSettings, sample: Tensor, seed: int) -> None:
        if not settings.device.startswith("cuda"):  # its Triton decoder needs a GPU
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(seed)
        self.settings = settings
        self.sae = SparseCoder(settings.d_in, SparseCoderConfig(num_latents=settings.d_sae,
                                                                k=settings.k),
                               device=settings.device)
        with torch.no_grad():  # sparsify's trainer starts b_dec at the data mean
            self.sae.b_dec.copy_(sample.to(settings.device).float().mean(0))
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=settings.lr)
        self.since_fired = torch.zeros(settings.d_sae, dtype=torch.long, device=settings.device)

    def step(self, x: Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dead = self.since_fired >= self.settings.dead_after_tokens
        out = self.sae(x, dead_mask=dead)
        loss = out.fvu + self.settings.aux_coefficient * out.auxk_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.since_fired += len(x)
        self.since_fired[out.latent_indices.flatten()] = 0
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.sae.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.sae(x).sae_out


class SAELensTopK:
    """SAELens' ``TopKTrainingSAE`` through ``training_forward_pass`` (MSE + AuxK)."""

    name = "SAELens TopKTrainingSAE"

    def __init__(self, settings: PeerSettings, sample: Tensor, seed: int) -> None:
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        torch.manual_seed(seed)
        self.settings = settings
        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(
            d_in=settings.d_in, d_sae=settings.d_sae, k=settings.k, device=settings.device,
            aux_loss_coefficient=settings.aux_coefficient))
        with torch.no_grad():
            self.sae.b_dec.copy_(sample.to(settings.device).float().mean(0))
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=settings.lr)
        self.since_fired = torch.zeros(settings.d_sae, dtype=torch.long, device=settings.device)
        self.n_steps = 0

    def step(self, x: Tensor, lr: float) -> None:
        from sae_lens.saes.sae import TrainStepInput

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        dead = self.since_fired >= self.settings.dead_after_tokens
        out = self.sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=self.n_steps,
            is_logging_step=False))
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.since_fired += len(x)
        self.since_fired[(out.feature_acts > 0).any(dim=0)] = 0
        self.optimizer.step()
        self.n_steps += 1

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.sae(x)


PEERS: dict[str, type[ResaeTopK] | type[SparsifyTopK] | type[SAELensTopK]] = {
    "resae": ResaeTopK, "sparsify": SparsifyTopK, "saelens": SAELensTopK,
}
