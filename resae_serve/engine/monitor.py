"""Per-token feature monitoring, encoded off the decode path.

The op hands over, per monitored layer, the edited block output of the tokens of monitoring
requests (and the previous layer's, for residual inputs;
:class:`~resae_serve.engine.tables.LayerCapture`). :class:`Monitor` encodes them on a background
thread, moved off the worker's cores when it has them to itself, turns the codes into per-token
records (top-k, watched values, threshold events) and keeps per-request results in token order.

Overload policy: the queue holds ``max_pending`` steps. When it is full the step thread waits
for a free slot (back-pressure: decoding slows down; no monitoring result is ever dropped and
results stay in step order). ``stalled_steps`` counts those waits.

Results are :class:`~resae_serve.engine.rpc.MonitorRecord` s, one per request, position and
layer. Thresholds (:class:`~resae_serve.engine.spec.Threshold`) are checked here, on the very
codes that are reported: a record carries its :class:`~resae_serve.engine.rpc.MonitorEvent` s.
Each record also says whether its position lies outside the dictionary's training distribution
(:attr:`Monitor.context`, :mod:`resae_serve.context`: the first position, norm outliers);
thresholds skip such positions unless the request's
:attr:`~resae_serve.engine.spec.MonitorSpec.include_out_of_distribution` asks for them.

Server-wide monitors reach the monitor as the request's
:attr:`~resae_serve.engine.spec.SteeringSpec.guards` (:meth:`Monitor.register`): their layers
are encoded beside the request's own, each record carries the guards' codes at its layer
(``guard_values``) and their events (``MonitorEvent.monitor`` names the guard; out-of-distribution
positions skipped unless the guard includes them); a record of a layer only guards asked for
is marked ``client=False`` and is not reported to the caller.

A preempted request is recomputed from its first token; its positions are encoded again.
:meth:`Monitor.take` keeps the latest record per (position, layer), and ``recomputed`` counts
the repeats (a direct measure of preemption seen by the monitor).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from resae_serve.context import TrainingContext
from resae_serve.engine.encoders import MonitorEncoder, TorchEncoder
from resae_serve.engine.rpc import MonitorEvent, MonitorRecord
from resae_serve.engine.spec import Guard, MonitorSpec
from resae_serve.engine.tables import Codes, LayerCapture
from resae_serve.resae import ReSAE
from resae_serve.saes.base import SparseCodes

logger = logging.getLogger(__name__)


@dataclass
class StepCapture:
    """Copied activations of one forward pass."""

    keys: list[str]
    """Request key per request of the flat batch."""
    counts: np.ndarray
    starts: np.ndarray
    layers: dict[int, tuple[np.ndarray, LayerCapture]] = field(default_factory=dict)
    """Dictionary position → (flat token indices (n,), the edited block outputs)."""
    ready: torch.cuda.Event | None = None
    """On CUDA: recorded on the decode stream after the captures were gathered; the monitor's
    own stream waits for it (never the decode stream for the monitor)."""


def _summaries(codes: Codes, d_sae: int, k: int, columns: list[int]
               ) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
    """Top-``k`` ids and values and the codes of ``columns``, per token, as lists.

    Sparse codes (N, k_sae) are read as they are (no dense (N, d_sae) tensor) unless more than
    ``k_sae`` features are asked for."""
    if isinstance(codes, SparseCodes) and k <= codes.values.shape[1]:
        top = codes.values.topk(k)
        ids = codes.indices.gather(1, top.indices)
        cols = torch.tensor(columns, dtype=torch.long)
        match = codes.indices.unsqueeze(1) == cols.view(1, -1, 1)          # (N, C, k_sae)
        picked = (codes.values.unsqueeze(1) * match).sum(-1)
        return ids.tolist(), top.values.tolist(), picked.tolist()
    z = codes
    if isinstance(z, SparseCodes):
        z = torch.zeros(len(z.values), d_sae, dtype=z.values.dtype).scatter_(
            1, z.indices, z.values)                                         # (N, d_sae)
    top = z.topk(k)
    return top.indices.tolist(), top.values.tolist(), z[:, columns].tolist()


def _move_off_worker_cores() -> None:
    """Run the calling (monitor) thread on the CPUs the worker is not bound to.

    vLLM's CPU worker pins its threads to its share of the cores (``VLLM_CPU_OMP_THREADS_BIND``)
    and this thread inherits that mask, so without this its encodes would take turns with the
    forward pass on the same core. The other cores run the engine core process, which mostly
    spins waiting for the worker. ``RESAE_MONITOR_CPUS``: ``auto`` (default; the CPUs outside
    the inherited mask, when there are any), ``inherit`` (stay), or a list such as ``0,1``.
    """
    choice = os.environ.get("RESAE_MONITOR_CPUS", "auto").strip()
    if choice == "inherit" or not hasattr(os, "sched_setaffinity"):
        return
    try:
        if choice == "auto":
            cpus = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
        else:
            cpus = {int(c) for c in choice.split(",") if c.strip()}
        if cpus:
            os.sched_setaffinity(0, cpus)        # pid 0: this thread only
            logger.info("monitor thread runs on CPUs %s", sorted(cpus))
    except (OSError, ValueError) as err:
        logger.warning("RESAE_MONITOR_CPUS=%r not applied (%s); the monitor thread shares the "
                       "worker's CPUs", choice, err)


class _Discard(NamedTuple):
    """Queue marker: drop the results of request ``key``."""

    key: str


class _Watched:
    """What a request asks the monitor for: its own spec and its guards (by layer, computed
    once: both are asked per token and layer)."""

    __slots__ = ("_at", "_layers", "guards", "spec")

    def __init__(self, spec: MonitorSpec, guards: tuple[Guard, ...]) -> None:
        self.spec, self.guards = spec, guards
        self._at = {layer: tuple(g for g in guards if g.layer == layer)
                    for layer in {g.layer for g in guards}}
        self._layers = frozenset(spec.layers) | frozenset(self._at)

    def at(self, layer: int) -> tuple[Guard, ...]:
        return self._at.get(layer, ())

    def wants(self, layer: int) -> bool:
        return layer in self._layers


_NOTHING = _Watched(MonitorSpec(), ())
_QueueItem = StepCapture | _Discard | tuple[str, _Watched | None]


class Monitor:
    """Background encoder of :class:`StepCapture` records; results fetched by request key."""

    def __init__(self, resae: ReSAE, *, max_pending: int = 64,
                 encoder: MonitorEncoder | None = None,
                 context: TrainingContext | None = None) -> None:
        self.resae = resae
        self.context = context or TrainingContext.unknown()
        """How the dictionary was trained (its manifest's ``training_context``): which
        positions the records flag as out of distribution."""
        self.encoder: MonitorEncoder = encoder or TorchEncoder(resae)
        """Encodes one layer's captured tokens (:mod:`~resae_serve.engine.encoders`)."""
        device = resae.saes[0].W_dec.device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.specs: dict[str, _Watched] = {}
        self._hint_cache: dict[int, tuple[list[int], int]] = {}   # cleared when specs change
        self.results: dict[str, list[MonitorRecord]] = defaultdict(list)
        self.stalled_steps = 0
        self.recomputed = 0
        self._seen: dict[tuple[str, int], int] = {}   # (key, layer) -> furthest position
        self._discarded: set[str] = set()   # aborted keys still in the engine: drop at finish
        self._queue: queue.Queue[_QueueItem] = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="resae-monitor", daemon=True)
        self._thread.start()

    def register(self, key: str, spec: MonitorSpec, guards: tuple[Guard, ...] = ()) -> None:
        """A request starts monitoring (queued, so it orders with the steps around it):
        its own ``spec`` and the server-wide monitors that apply to it."""
        self._queue.put((key, _Watched(spec, guards)))

    def submit(self, step: StepCapture) -> None:
        try:
            self._queue.put_nowait(step)
        except queue.Full:
            self.stalled_steps += 1
            self._queue.put(step)

    def finish(self, key: str) -> None:
        """The request has left the engine: forget its spec once its queued steps are encoded
        (a later request may reuse the key; its :meth:`register` comes after this)."""
        self._queue.put((key, None))

    def discard(self, key: str) -> None:
        """The caller abandoned the request (abort): drop its results, also those of steps
        still queued or still to come before the engine lets it go (no store growth from
        cancelled requests)."""
        self._queue.put(_Discard(key))

    @property
    def stored_keys(self) -> int:
        """Requests with results waiting to be taken."""
        with self._lock:
            return len(self.results)

    def flush(self) -> None:
        self._queue.join()

    def take(self, key: str, *, wait: bool = True) -> list[MonitorRecord]:
        """Results of one request so far, sorted by (position, layer), removed from the store.

        ``wait`` first encodes every queued step; without it, only what is already encoded
        (steps are encoded in order, so a later take continues where this one stopped).
        """
        if wait:
            self.flush()
        with self._lock:
            records = self.results.pop(key, [])
        latest = {(r.position, r.layer): r for r in records}   # recomputed: keep the last
        return [latest[k] for k in sorted(latest)]

    def take_many(self, keys: list[str], *, wait: bool = False
                  ) -> dict[str, list[MonitorRecord]]:
        if wait:
            self.flush()
        return {key: self.take(key, wait=False) for key in keys}

    def _codes(self, i: int, capture: LayerCapture, take: torch.Tensor | None) -> Codes:
        """Codes of the captured tokens ``take`` (all when ``None``), on the host.

        On CUDA the encode runs on the monitor's stream (the current one here) and only the
        codes come back, through pinned memory; waiting for them waits for this stream
        alone."""
        h, h_prev = capture.h, capture.h_prev
        if take is not None:
            take = take.to(h.device)
            h, h_prev = h[take], None if h_prev is None else h_prev[take]
        watch, top_k = self._hints(i)
        codes = self.encoder.codes(i, h, h_prev, watch, top_k)
        if self._stream is None:
            return codes
        host = (SparseCodes(*(t.to("cpu", non_blocking=True) for t in codes))
                if isinstance(codes, SparseCodes) else codes.to("cpu", non_blocking=True))
        self._stream.synchronize()
        return host

    def _hints(self, i: int) -> tuple[list[int], int]:
        """What any monitored request may read at dictionary position ``i`` (a superset of
        one step's): the watched and thresholded features, and the largest top-k. Encoders
        without the dense code compute exactly these. Kept until the specs change."""
        if i not in self._hint_cache:
            layer = self.resae.layers[i]
            specs = [w.spec for w in self.specs.values() if layer in w.spec.layers]
            watch = sorted({f for s in specs for f in s.watch}
                           | {t.feature for s in specs for t in s.thresholds if t.layer == layer}
                           | {g.feature for w in self.specs.values() for g in w.at(layer)})
            self._hint_cache[i] = watch, max((s.top_k for s in specs), default=0)
        return self._hint_cache[i]

    def _records(self, step: StepCapture, i: int, capture: LayerCapture,
                 idx: np.ndarray, wanted: np.ndarray, req: np.ndarray, specs: list[_Watched],
                 firsts: np.ndarray) -> list[MonitorRecord]:
        """Records of the ``wanted`` captured tokens.

        One ``topk`` and one gather for all tokens, then plain lists (per-token tensor calls
        would cost more than the whole step at decode batch sizes).
        """
        layer, d_sae = self.resae.layers[i], self.resae.saes[i].config.d_sae
        chosen = [specs[row] for row in wanted.tolist()]
        k = max((w.spec.top_k for w in chosen if layer in w.spec.layers), default=0)
        columns = sorted({f for w in chosen for f in w.spec.watch}
                         | {t.feature for w in chosen for t in w.spec.thresholds
                            if t.layer == layer}
                         | {g.feature for w in chosen for g in w.at(layer)})
        column = {f: c for c, f in enumerate(columns)}
        codes = self._codes(i, capture, torch.from_numpy(wanted)
                            if len(chosen) < len(specs) else None)
        top_ids, top_values, picked = _summaries(codes, d_sae, k, columns)
        js = req[wanted]
        positions = (step.starts[js] + idx[wanted] - firsts[js]).tolist()
        reasons = self._out_of_distribution(i, capture, wanted, positions)
        records: list[MonitorRecord] = []
        for n, (row, watched) in enumerate(zip(wanted.tolist(), chosen, strict=True)):
            j, position, ood = int(js[n]), int(positions[n]), int(reasons[n])
            spec, guards, values = watched.spec, watched.at(layer), picked[n]
            client = layer in spec.layers
            events = tuple(
                MonitorEvent(position, layer, t.feature, value, t.value) for t in spec.thresholds
                if t.layer == layer and (value := values[column[t.feature]]) >= t.value
            ) if client and (not ood or spec.include_out_of_distribution) else ()
            guard_values = tuple(values[column[g.feature]] for g in guards)
            events += tuple(
                MonitorEvent(position, layer, g.feature, value, g.threshold, g.name)
                for g, value in zip(guards, guard_values, strict=True)
                if value >= g.threshold and (not ood or g.include_out_of_distribution))
            top = spec.top_k if client else 0
            records.append(MonitorRecord(
                step.keys[j], position, layer,
                tuple(top_ids[n][:top]) if top else (),
                tuple(top_values[n][:top]) if top else (),
                tuple(values[column[f]] for f in spec.watch) if client else (),
                tuple(capture.h[row].float().tolist()) if client and spec.raw else (), events,
                ood, guard_values, client))
        return records

    def _out_of_distribution(self, i: int, capture: LayerCapture, wanted: np.ndarray,
                             positions: list[int]) -> np.ndarray:
        """:class:`~resae_serve.context.OutOfDistribution` codes of the ``wanted`` captured
        tokens: the first position, and the norm of the block output the codes were read
        from (this request's edits included) against the training rule."""
        norms = np.zeros(len(positions))
        if self.context.norm_limit(i) is not None:
            h = capture.h.index_select(0, torch.from_numpy(wanted).to(capture.h.device))
            norms = h.float().norm(dim=-1).cpu().numpy()
        return self.context.reasons(i, positions, norms)

    def _run(self) -> None:
        _move_off_worker_cores()
        while True:
            step = self._queue.get()
            try:
                if isinstance(step, StepCapture):
                    self._summarize(step)
                    continue
                if isinstance(step, _Discard):
                    key = step.key
                    with self._lock:
                        self.results.pop(key, None)
                    if key in self.specs:           # its finish marker is still to come
                        self._discarded.add(key)
                    continue
                key, spec = step
                for layer in self.resae.layers:
                    self._seen.pop((key, layer), None)
                self._hint_cache.clear()
                if spec is None:
                    self.specs.pop(key, None)
                    if key in self._discarded:
                        self._discarded.discard(key)
                        with self._lock:
                            self.results.pop(key, None)
                else:
                    self.specs[key] = spec
            except Exception:  # a monitoring failure must never take the engine down
                logger.exception("monitor step failed")
            finally:
                self._queue.task_done()

    @torch.no_grad()
    def _summarize(self, step: StepCapture) -> None:
        """Records of one step, one batched summary per layer over every monitored token."""
        if self._stream is None:
            self._summarize_here(step)
            return
        if step.ready is not None:
            self._stream.wait_event(step.ready)
        for _, capture in step.layers.values():   # made on the decode stream, read on ours
            for t in capture:
                if t is not None:
                    t.record_stream(self._stream)
        with torch.cuda.stream(self._stream):
            self._summarize_here(step)

    def _summarize_here(self, step: StepCapture) -> None:
        ends = np.cumsum(step.counts)
        firsts = ends - step.counts
        records: list[MonitorRecord] = []
        for i, (idx, capture) in sorted(step.layers.items()):
            layer = self.resae.layers[i]
            req = np.searchsorted(ends, idx, side="right")                        # (n,)
            specs = [self.specs.get(step.keys[j], _NOTHING) for j in req.tolist()]
            wanted = np.array([w.wants(layer) for w in specs], dtype=bool)
            if not wanted.any():
                continue
            records += self._records(step, i, capture, idx, np.flatnonzero(wanted), req, specs,
                                     firsts)
        with self._lock:
            for record in records:
                seen = (record.key, record.layer)
                if record.position <= self._seen.get(seen, -1):
                    self.recomputed += 1
                else:
                    self._seen[seen] = record.position
                self.results[record.key].append(record)
