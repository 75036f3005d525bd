"""The monitor's encoders: one layer's codes from the block outputs the op captured.

:class:`~resae_serve.engine.monitor.Monitor` encodes one layer at a time, for the tokens that
are monitored at that layer, through one of these (what ``--runtime`` chose; see
:func:`~resae_serve.engine.runtime.choose_runtime`):

- :class:`TorchEncoder` (``torch``): the op's own math, ``ReSAE.sae_input``, the encoder GEMM
  with ``b_dec`` folded in (:class:`~resae_serve.engine.gemm.EncoderGemm`, ``torch.addmm``:
  vLLM's packed oneDNN matmul may only run on the model's thread) and the SAE's activation.
  It is the oracle the others are tested against.
- :class:`RuntimeEncoder` (``onnxruntime``, ``tensorrt``): the export's per-layer
  ``encode_layer`` graph (affine prediction, residual, scale, encoder, top-k and the codes of
  watched features, all in the graph) through :class:`~resae_serve.export.runtime.FeatureRuntime`.

Both return the codes :func:`~resae_serve.engine.tables.activate` returns: sparse top-k codes
for a TopK layer, a dense ``(tokens, d_sae)`` code for ReLU / JumpReLU layers. The graph gives
those layers their top-k slots and the watched features only, so the dense code is rebuilt
from them; it reads exactly like the torch one for every top-k up to the SAE's ``k`` and every
watched feature. A request asking for more than ``k`` features at such a layer is encoded with
torch (the slots cannot hold them).

onnxruntime session options, set on purpose (:data:`MONITOR_THREADS`, spinning off). Measured
on this 2-core CPU (shared with other work, so ±15 %) with a SmolLM2-sized residual layer
(576 -> 4608, k 32), one call, median milliseconds:

======  ==================  ===============  ===============  ===============  ===============
tokens  torch (1 thread)    ORT 1, spin      ORT 1, no spin   ORT 2, spin      ORT 2, no spin
======  ==================  ===============  ===============  ===============  ===============
1       0.18                0.17             0.16             0.15             0.17
8       0.88                0.32             0.32             0.36             0.35
32      2.58                1.10             1.12             1.49             1.08
======  ==================  ===============  ===============  ===============  ===============

One intra-op thread: a second one bought nothing at these sizes (within noise at 1 and 32
tokens, slower at 8), while the monitor thread runs beside the worker's forward pass, which
holds its own cores: a second ORT thread would compete with it (and with the engine core
process) for the same few cores. Spinning off: no faster with it on, and a pool that
spin-waits burns a core between steps. With one thread
ORT runs the graph on the calling (monitor) thread and creates no pool at all, so the thread
placement of :func:`~resae_serve.engine.monitor._move_off_worker_cores` holds for it too.
``RESAE_MONITOR_THREADS`` overrides the count (e.g. on a GPU host's spare cores); a pool of more
than one thread is created with the sessions at start-up, on the worker's thread, and so
inherits the worker's CPU binding rather than the monitor's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from resae_serve.engine.gemm import EncoderGemm
from resae_serve.engine.rpc import FeatureRuntimeInfo
from resae_serve.engine.tables import Codes, activate
from resae_serve.resae import ReSAE
from resae_serve.saes.topk import TopKSAE

logger = logging.getLogger(__name__)

MONITOR_THREADS = 1
"""onnxruntime intra-op threads of the monitor's sessions (see the module docstring)."""
THREADS_ENV = "RESAE_MONITOR_THREADS"


class MonitorEncoder(Protocol):
    """Codes of one dictionary layer for the monitor."""

    info: FeatureRuntimeInfo
    """What runs (reported by the worker RPC ``resae_runtime``)."""

    def codes(self, i: int, h: torch.Tensor, h_prev: torch.Tensor | None,
              watch: Sequence[int] = (), top_k: int = 0) -> Codes:
        """Codes of dictionary layer ``i`` (position) for block outputs ``h`` (n, d) and, at
        a residualized layer, the previous layer's ``h_prev`` (n, d). ``watch``: features
        whose codes will be read, ``top_k``: the most features that will be ranked (hints
        for encoders that do not compute the dense code)."""
        ...


class TorchEncoder:
    """The op's math in torch (see the module docstring)."""

    def __init__(self, resae: ReSAE, *, reason: str = "") -> None:
        self.resae = resae
        self._gemm = [EncoderGemm(sae, packed=False) for sae in resae.saes]
        self.info = FeatureRuntimeInfo("torch", "", "float32", torch.get_num_threads(), "",
                                       reason)

    @torch.no_grad()
    def codes(self, i: int, h: torch.Tensor, h_prev: torch.Tensor | None,
              watch: Sequence[int] = (), top_k: int = 0) -> Codes:
        u = self.resae.sae_input(i, h.float(), None if h_prev is None else h_prev.float())
        return activate(self.resae.saes[i], self._gemm[i](u.to(self._gemm[i].dtype)))


class RuntimeEncoder:
    """The export's ``encode_layer`` graphs through a feature runtime."""

    def __init__(self, resae: ReSAE, runtime: Any, info: FeatureRuntimeInfo) -> None:
        self.resae, self.runtime, self.info = resae, runtime, info
        self._sparse = [type(sae) is TopKSAE for sae in resae.saes]   # as activate() decides
        self._torch: TorchEncoder | None = None

    @torch.no_grad()
    def codes(self, i: int, h: torch.Tensor, h_prev: torch.Tensor | None,
              watch: Sequence[int] = (), top_k: int = 0) -> Codes:
        sae, layer = self.resae.saes[i], self.resae.layers[i]
        if not self._sparse[i] and top_k > sae.config.k:
            if self._torch is None:
                logger.info("monitor: top_k above the SAE's k=%d at a %s layer is encoded "
                            "with torch", sae.config.k, sae.config.architecture)
                self._torch = TorchEncoder(self.resae)
            return self._torch.codes(i, h, h_prev, watch, top_k)
        ids = [] if self._sparse[i] else list(watch)
        out = self.runtime.encode_layer(layer, h, h_prev, ids)
        if self._sparse[i]:
            return out.codes
        n, d_sae = out.codes.values.shape[0], sae.config.d_sae
        dense = torch.zeros(n, d_sae, dtype=out.codes.values.dtype,
                            device=out.codes.values.device)                    # (n, d_sae)
        dense.scatter_(1, out.codes.indices, out.codes.values)
        if ids:
            columns = torch.tensor(ids, dtype=torch.long, device=dense.device)
            dense.scatter_(1, columns.expand(n, -1), out.watched.to(dense.dtype))
        return dense


def monitor_threads() -> int:
    """:data:`MONITOR_THREADS`, or ``RESAE_MONITOR_THREADS`` when set."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return MONITOR_THREADS
    try:
        threads = int(value)
    except ValueError:
        threads = -1
    if threads < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}; must be an integer >= 1")
    return threads


def build_encoder(resae: ReSAE, backend: str, export: str | Path | None, *,
                  device: str = "cpu", provider: str = "auto", precision: str = "float32",
                  reason: str = "") -> MonitorEncoder:
    """The monitor's encoder for ``backend`` (``torch``, ``onnxruntime``, ``tensorrt``) over
    the export folder ``export``; refuses an export of another dictionary (fingerprint), and
    runs each layer's graph once, so a runtime that cannot run fails here, at start-up."""
    if backend == "torch":
        return TorchEncoder(resae, reason=reason)
    from resae_serve.export.folder import dictionary_fingerprint, read_export_manifest
    from resae_serve.export.runtime import RuntimeConfig, open_runtime

    if not export:
        raise ValueError(f"runtime={backend!r} needs an export folder (resae_export)")
    manifest = read_export_manifest(Path(export))
    found = dictionary_fingerprint(resae)
    if found != manifest.fingerprint:
        raise ValueError(f"{export}: field 'fingerprint' is {manifest.fingerprint}, but the "
                         f"served dictionary is {found}; export it again")
    threads = monitor_threads()
    config = RuntimeConfig(backend=backend, device=device, precision=precision,
                           provider=provider, threads=threads, allow_spinning=False)
    runtime = open_runtime(Path(export), config)
    for i, layer in enumerate(resae.layers):          # sessions / engines now, not mid-request
        h = torch.zeros(1, resae.d_model, device=runtime.device)
        runtime.encode_layer(layer, h, h if (resae.mode == "resae" and i) else None, [0])
    actual = str(getattr(runtime, "provider", "") or "")
    info = FeatureRuntimeInfo(runtime.backend, actual, runtime.precision, threads,
                              str(Path(export).resolve()), reason)
    logger.info("monitor encodes through %s%s (%d intra-op thread%s, spinning off) from %s",
                runtime.backend, f" ({actual} provider)" if actual else "", threads,
                "" if threads == 1 else "s", export)
    return RuntimeEncoder(resae, runtime, info)
