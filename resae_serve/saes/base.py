"""The SAE base class: parameters in SAELens layout, shared encode/decode ops, tensor I/O.

Every architecture encodes ``pre = (x - b_dec) @ W_enc + b_enc`` and decodes
``x_hat = z @ W_dec + b_dec``; subclasses differ in the activation applied to ``pre`` and in
their training loss. Tensors are named as in SAELens (``W_enc``, ``b_enc``, ``W_dec``,
``b_dec`` and, for JumpReLU, ``threshold``) so saved layers read into SAELens unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resae_serve.saes.config import SAEConfig
from resae_serve.saes.losses import auxk_loss

_Self = TypeVar("_Self", bound="SAE")


class SparseCodes(NamedTuple):
    """The top-k codes of each token, as indices and values."""

    indices: Tensor
    """(N, k) int64 latent ids."""

    values: Tensor
    """(N, k) activations; 0 where fewer than k latents are active (the id is then arbitrary)."""


class TrainStepOutput(NamedTuple):
    """Result of :meth:`SAE.training_step` on one batch."""

    loss: Tensor
    """Scalar to backpropagate."""

    x_hat: Tensor
    """(N, d_in) reconstruction."""

    metrics: dict[str, Tensor]
    """``loss``, ``mse``, ``l0`` (mean active latents per token), plus ``aux`` (TopK and
    BatchTopK; 0 when no latent is dead) or ``l1`` (ReLU): unweighted loss terms. Detached
    0-dim tensors on the SAE's device, so that a step needs no device sync; ``float()`` them
    when they are logged."""

    fired: Tensor
    """(d_sae,) bool: latents active on at least one token of this batch."""


def geometric_median(points: Tensor, n_steps: int = 20, eps: float = 1e-6) -> Tensor:
    """Geometric median of ``points`` (N, d) -> (d,) float32, by Weiszfeld steps from the mean."""
    points = points.float()
    median = points.mean(dim=0)
    for _ in range(n_steps):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)  # (N,)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median


def random_unit_rows(n_rows: int, n_cols: int, *, dtype: torch.dtype,
                     device: torch.device | str | None = None) -> Tensor:
    """(n_rows, n_cols) Gaussian rows scaled to unit norm, drawn from torch's global RNG."""
    rows = torch.randn(n_rows, n_cols, device=device)
    return (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(dtype)


class SAE(nn.Module, ABC):
    """Sparse autoencoder ``x -> z -> x_hat`` with a subclass-defined activation.

    ``pre = (x - b_dec) @ W_enc + b_enc`` (N, d_sae); ``z = act(pre)`` (N, d_sae);
    ``x_hat = z @ W_dec + b_dec`` (N, d_in). Parameters: ``W_enc`` (d_in, d_sae),
    ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,). A fresh SAE has unit-norm
    decoder rows, ``W_enc = W_dec.T`` and zero biases; :meth:`init_from_data` redraws them.
    """

    architecture: ClassVar[str]
    """Registry key this class implements; must equal ``config.architecture``."""

    tensor_names: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")
    """Names of :meth:`inference_tensors`, in SAELens spelling."""

    def __init__(self, config: SAEConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if config.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} needs config.architecture={self.architecture!r}, "
                f"got {config.architecture!r}"
            )
        self.config = config
        W_dec = random_unit_rows(config.d_sae, config.d_in, dtype=dtype, device=device)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(config.d_in, dtype=dtype, device=device))

    # ----------------------------------------------------------------------------- encode
    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations ``(x - b_dec) @ W_enc + b_enc``: (N, d_in) -> (N, d_sae)."""
        if x.shape[-1] != self.config.d_in:
            raise ValueError(f"input has last dimension {x.shape[-1]}, expected d_in="
                             f"{self.config.d_in}")
        x = x.to(self.W_enc.dtype)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    @abstractmethod
    def activate(self, pre: Tensor) -> Tensor:
        """Dense codes from pre-activations: (N, d_sae) -> (N, d_sae). Per token."""

    def activate_sparse(self, pre: Tensor) -> SparseCodes:
        """The ``config.k`` largest codes of each token from its pre-activations (N, d_sae).

        Architectures without a fixed k (ReLU, JumpReLU) are truncated to k.
        """
        values, indices = self.activate(pre).topk(self.config.k, dim=-1)
        return SparseCodes(indices, values)

    def encode(self, x: Tensor) -> Tensor:
        """Dense post-activation codes: (N, d_in) -> (N, d_sae). Per token, never batch-wide."""
        return self.activate(self.pre_acts(x))

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        """The ``config.k`` largest codes of each token: (N, d_in) -> (N, k) indices and values.

        Per token only. Architectures without a fixed k (ReLU, JumpReLU) are truncated to k.
        """
        return self.activate_sparse(self.pre_acts(x))

    # ----------------------------------------------------------------------------- decode
    def decode(self, z: Tensor) -> Tensor:
        """``z @ W_dec + b_dec``: (N, d_sae) -> (N, d_in)."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, codes: SparseCodes) -> Tensor:
        """Gather-and-sum of decoder rows: (N, k) codes -> (N, d_in); equals dense decode."""
        return self.decode_rows(codes) + self.b_dec

    def decode_rows(self, codes: SparseCodes) -> Tensor:
        """``sum_j values[:, j] * W_dec[indices[:, j]]`` without ``b_dec``: -> (N, d_in)."""
        lead = codes.indices.shape[:-1]
        k = codes.indices.shape[-1]
        out = F.embedding_bag(
            codes.indices.reshape(-1, k), self.W_dec,
            per_sample_weights=codes.values.reshape(-1, k).to(self.W_dec.dtype), mode="sum",
        )  # (N, d_in)
        return out.reshape(*lead, self.config.d_in)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``decode(encode(x))``: (N, d_in) -> (N, d_in)."""
        return self.decode(self.encode(x))

    # ----------------------------------------------------------------------------- training
    @abstractmethod
    def training_step(self, x: Tensor, dead_mask: Tensor | None = None, *,
                      n_dead: int | None = None) -> TrainStepOutput:
        """Loss, reconstruction, metrics and fired latents on one batch ``x`` (N, d_in).

        ``dead_mask`` (d_sae,) bool marks latents the trainer counts as dead (for AuxK);
        ``n_dead``, its number of True entries when the caller knows it (saves a device sync).
        """

    def auxk_term(self, pre: Tensor, error: Tensor, dead_mask: Tensor | None, *,
                  n_dead: int | None = None) -> Tensor:
        """AuxK loss: reconstruct ``error`` (N, d_in) from the top ``aux_k`` dead pre-acts.

        ``pre``: (N, d_sae) pre-activations. Zero (a scalar) when no latent is dead. Scaled by
        ``min(n_dead / aux_k, 1)`` as in sparsify so a few dead latents weigh little.
        """
        if dead_mask is not None and n_dead is None:
            n_dead = int(dead_mask.sum())
        if dead_mask is None or n_dead == 0 or n_dead is None:
            return pre.new_zeros((), dtype=torch.float32)
        aux_k = self.config.effective_aux_k()
        scale = min(n_dead / aux_k, 1.0)
        aux_k = min(aux_k, n_dead)
        dead_pre = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
        values, indices = dead_pre.topk(aux_k, dim=-1, sorted=False)  # (N, aux_k)
        error_hat = self.decode_rows(SparseCodes(indices, values.relu()))
        return scale * auxk_loss(error.detach(), error_hat)

    @torch.no_grad()
    def init_from_data(self, x_sample: Tensor, *, encoder_scale: float = 1.0) -> None:
        """Gao et al. initialisation from a sample of inputs (M, d_in).

        ``b_dec`` = geometric median of the sample; ``W_dec`` random unit rows (torch global
        RNG); ``W_enc = encoder_scale * W_dec.T``; ``b_enc = 0``.
        """
        if x_sample.ndim != 2 or x_sample.shape[1] != self.config.d_in or len(x_sample) == 0:
            raise ValueError(f"x_sample has shape {list(x_sample.shape)}, expected [M, "
                             f"{self.config.d_in}] with M >= 1")
        dtype, device = self.W_dec.dtype, self.W_dec.device
        self.b_dec.copy_(geometric_median(x_sample.to(device)).to(dtype))
        self.W_dec.copy_(random_unit_rows(*self.W_dec.shape, dtype=dtype, device=device))
        self.W_enc.copy_(self.W_dec.T * encoder_scale)
        self.b_enc.zero_()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every row of ``W_dec`` to unit norm (call after ``optimizer.step``)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Remove from ``W_dec.grad`` each row's component along that row (before the step)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        W = self.W_dec
        along = (grad * W).sum(dim=1, keepdim=True) / W.pow(2).sum(dim=1, keepdim=True).clamp_min(
            1e-12
        )  # (d_sae, 1)
        grad.sub_(along * W)

    # ----------------------------------------------------------------------------- tensors
    def inference_sae(self) -> SAE:
        """The SAE to save for inference; ``self`` except for BatchTopK (-> JumpReLU)."""
        return self

    def inference_tensors(self) -> dict[str, Tensor]:
        """Detached copies of the tensors named :attr:`tensor_names` (SAELens names)."""
        return {name: getattr(self, name).detach().clone() for name in self.tensor_names}

    @classmethod
    def tensor_shapes(cls, config: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Expected shape of each of :attr:`tensor_names` under ``config``."""
        shapes = {
            "W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,),
            "W_dec": (config.d_sae, config.d_in), "b_dec": (config.d_in,),
            "threshold": (config.d_sae,),
        }
        return {name: shapes[name] for name in cls.tensor_names}

    @classmethod
    def from_tensors(cls: type[_Self], config: SAEConfig, tensors: dict[str, Tensor]) -> _Self:
        """Build from :meth:`inference_tensors` output; dtype and device come from the tensors.

        Strict: a missing, unexpected, mis-shaped, non-float or non-finite tensor, or mixed
        dtypes, raise ``ValueError`` naming the tensor.
        """
        expected = cls.tensor_shapes(config)
        missing = [name for name in expected if name not in tensors]
        if missing:
            raise ValueError(f"{cls.architecture} SAE tensors: missing {missing}; expected "
                             + ", ".join(f"{n} {list(s)}" for n, s in expected.items()))
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise ValueError(f"{cls.architecture} SAE tensors: unexpected {extra}; expected "
                             f"only {list(expected)}")
        dtype = tensors["W_enc"].dtype
        for name, shape in expected.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {list(tensor.shape)}, expected "
                                 f"{list(shape)} for d_in={config.d_in}, d_sae={config.d_sae}")
            if not tensor.is_floating_point() or tensor.dtype != dtype:
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, expected a float "
                                 f"dtype shared by all tensors (W_enc is {dtype})")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"tensor {name!r} holds NaN or infinite values")
        sae = cls(config, dtype=dtype, device=tensors["W_enc"].device)
        with torch.no_grad():
            for name in expected:
                getattr(sae, name).copy_(tensors[name])
        return sae
