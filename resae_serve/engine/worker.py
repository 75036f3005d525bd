"""Worker extension (``worker_extension_cls``): the ``resae_*`` RPCs of the worker process.

Importing this module (vLLM does it in each engine process before building the model)
registers the hooked model classes ``Resae<Arch>`` with vLLM's model registry there
(:func:`resae_serve.engine.model.register_architectures`). The ``resae_*`` methods are mixed
into vLLM's worker class and called through ``collective_rpc``.
"""

from __future__ import annotations

from typing import Any

from resae_serve.engine.model import register_architectures
from resae_serve.engine.rpc import EngineInfo, EngineStats, records_to_wire

QUALNAME = "resae_serve.engine.worker.ResaeWorkerExtension"

register_architectures()


def _hook() -> Any:
    from resae_serve.engine.model import current_hook

    hook = current_hook()
    if hook is None:
        raise RuntimeError("the ReSAE model is not loaded in this worker")
    return hook


class ResaeWorkerExtension:
    """Methods reachable with ``collective_rpc``; their names are
    :class:`~resae_serve.engine.rpc.Rpc`, their callers the typed wrappers there. Results go
    back in wire form (plain builtins; see :mod:`~resae_serve.engine.rpc`)."""

    model_runner: Any

    def resae_bind(self) -> list[int]:
        """Point the step hook at this worker's model runner; returns the dictionary layers."""
        hook = _hook()
        hook.bind(self.model_runner)
        return list(hook.tables.layers)

    def resae_take(self, key: str) -> list[tuple[Any, ...]]:
        """Monitoring records of request ``key`` (waits for pending encodes)."""
        return records_to_wire(_hook().monitor.take(key))

    def resae_take_many(self, keys: list[str], wait: bool = False
                        ) -> dict[str, list[tuple[Any, ...]]]:
        """Records of several requests at once; ``wait`` encodes every queued step first."""
        taken = _hook().monitor.take_many(keys, wait=wait)
        return {key: records_to_wire(records) for key, records in taken.items()}

    def resae_discard(self, key: str) -> None:
        """Drop the monitoring results of an aborted request (now and when they arrive)."""
        _hook().monitor.discard(key)

    def resae_info(self) -> dict[str, Any]:
        """What the front end validates specs against
        (:class:`~resae_serve.engine.rpc.EngineInfo`)."""
        tables = _hook().tables
        return EngineInfo(tuple(tables.layers),
                          tuple(int(sae.W_dec.shape[0]) for sae in tables.resae.saes),
                          int(tables.resae.d_model), (tables.max_rows - 1) // 2).to_wire()

    def resae_runtime(self) -> dict[str, Any]:
        """The feature runtime the monitor encodes with
        (:class:`~resae_serve.engine.rpc.FeatureRuntimeInfo`)."""
        return dict(_hook().monitor.encoder.info.to_wire())

    def resae_stats(self) -> dict[str, Any]:
        """Counters (:class:`~resae_serve.engine.rpc.EngineStats`): table rows and requests,
        monitor health, the time split of the forward passes since start, and the bfloat16
        screen's reads."""
        hook = _hook()
        screens = [s for s in hook.tables.screens if s is not None]
        return EngineStats(
            rows_in_use=hook.tables.rows_in_use, requests=len(hook.tables.known_requests()),
            rejected=hook.rejected, monitor_stalled_steps=hook.monitor.stalled_steps,
            monitor_recomputed=hook.monitor.recomputed,
            monitor_stored_requests=hook.monitor.stored_keys, steps=hook.times.steps,
            forward_s=hook.times.forward_seconds, hook_host_s=hook.times.host_seconds,
            op_s=hook.tables.op_seconds, screened_reads=sum(s.reads for s in screens),
            screened_reads_resolved_exactly=sum(s.reads_resolved_exactly for s in screens),
        ).to_wire()
