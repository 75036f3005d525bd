"""Per-token feature monitoring, encoded off the decode path.

The op copies each monitored layer's block output (after that layer's edits) for the tokens of
monitoring requests; :class:`Monitor` encodes those copies with the torch ``ReSAE`` on a
background thread and keeps per-request results in token order.

Overload policy: the queue holds ``max_pending`` steps. When it is full the step thread encodes
that step itself (back-pressure: decoding slows down, no monitoring result is ever dropped).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resae_serve.engine.spec import MonitorSpec
from resae_serve.resae import ReSAE

logger = logging.getLogger(__name__)


@dataclass
class StepCapture:
    """Copied activations of one forward pass."""

    keys: list[str]
    """Request key per request of the flat batch."""
    counts: np.ndarray
    starts: np.ndarray
    layers: dict[int, tuple[np.ndarray, torch.Tensor]] = field(default_factory=dict)
    """Dictionary position → (flat token indices (n,), block outputs (n, d))."""


class Monitor:
    """Background encoder of :class:`StepCapture` records; results fetched by request key."""

    def __init__(self, resae: ReSAE, *, max_pending: int = 64) -> None:
        self.resae = resae
        self.specs: dict[str, MonitorSpec] = {}
        self.results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.inline_steps = 0
        self._queue: queue.Queue[StepCapture] = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="resae-monitor", daemon=True)
        self._thread.start()

    def register(self, key: str, spec: MonitorSpec) -> None:
        self.specs[key] = spec

    def submit(self, step: StepCapture) -> None:
        try:
            self._queue.put_nowait(step)
        except queue.Full:
            self.inline_steps += 1
            self._encode(step)

    def flush(self) -> None:
        self._queue.join()

    def take(self, key: str) -> list[dict[str, Any]]:
        """Results of one request so far, sorted by (position, layer), removed from the store."""
        self.flush()
        with self._lock:
            records = self.results.pop(key, [])
        return sorted(records, key=lambda r: (r["position"], r["layer"]))

    def _run(self) -> None:
        while True:
            step = self._queue.get()
            try:
                self._encode(step)
            except Exception:  # a monitoring failure must never take the engine down
                logger.exception("monitor step failed")
            finally:
                self._queue.task_done()

    @torch.no_grad()
    def _encode(self, step: StepCapture) -> None:
        """Encode one step, one batched SAE call per layer over every monitored token."""
        ends = np.cumsum(step.counts)
        firsts = ends - step.counts
        records: list[dict[str, Any]] = []
        for i, (idx, rows) in sorted(step.layers.items()):
            layer = self.resae.layers[i]
            req = np.searchsorted(ends, idx, side="right")                        # (n,)
            specs = [self.specs.get(step.keys[j], MonitorSpec()) for j in req.tolist()]
            wanted = np.array([layer in s.layers for s in specs], dtype=bool)
            if not wanted.any():
                continue                      # captured only as the next layer's h_prev
            h_prev = None
            if i and self.resae.mode == "resae":
                prev_idx, prev_rows = step.layers[i - 1]    # a superset of idx, both sorted
                at = np.minimum(np.searchsorted(prev_idx, idx), len(prev_idx) - 1)
                if not np.array_equal(prev_idx[at], idx):
                    raise RuntimeError(f"layer {layer}: previous layer not captured")
                h_prev = prev_rows[torch.from_numpy(at)].float()
            z = self.resae.saes[i].encode(self.resae.sae_input(i, rows.float(), h_prev))
            for row in np.flatnonzero(wanted).tolist():
                j, spec = int(req[row]), specs[row]
                record: dict[str, Any] = {
                    "key": step.keys[j], "layer": layer,
                    "position": int(step.starts[j] + idx[row] - firsts[j])}
                if spec.top_k:
                    values, ids = z[row].topk(spec.top_k)
                    record["top_k"] = (ids.tolist(), values.tolist())
                if spec.watch:
                    record["watch"] = z[row, list(spec.watch)].tolist()
                if spec.raw:
                    record["raw"] = rows[row].tolist()
                records.append(record)
        with self._lock:
            for record in records:
                self.results[record["key"]].append(record)
