"""Worker extension (``worker_extension_cls``): registers the architecture, exposes RPCs.

Importing this module in the worker process (vLLM does it before building the model) registers
``ResaeLlamaForCausalLM`` with vLLM's model registry there. The ``resae_*`` methods are mixed
into vLLM's worker class and called through ``LLM.collective_rpc``.
"""

from __future__ import annotations

from typing import Any

from vllm import ModelRegistry

ARCHITECTURE = "ResaeLlamaForCausalLM"
QUALNAME = "resae_serve.engine.worker.ResaeWorkerExtension"


def register_architecture() -> None:
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE,
                                     "resae_serve.engine.model:ResaeLlamaForCausalLM")


register_architecture()


def _hook() -> Any:
    from resae_serve.engine.model import current_hook

    hook = current_hook()
    if hook is None:
        raise RuntimeError("the ReSAE model is not loaded in this worker")
    return hook


class ResaeWorkerExtension:
    """Methods reachable with ``llm.collective_rpc("resae_…")``."""

    model_runner: Any

    def resae_bind(self) -> list[int]:
        """Point the step hook at this worker's model runner; returns the dictionary layers."""
        hook = _hook()
        hook.bind(self.model_runner)
        return list(hook.tables.layers)

    def resae_take(self, key: str) -> list[dict[str, Any]]:
        """Monitoring records of request ``key`` (waits for pending encodes)."""
        records: list[dict[str, Any]] = _hook().monitor.take(key)
        return records

    def resae_take_many(self, keys: list[str], wait: bool = False
                        ) -> dict[str, list[dict[str, Any]]]:
        """Records of several requests at once; ``wait`` encodes every queued step first."""
        records: dict[str, list[dict[str, Any]]] = _hook().monitor.take_many(keys, wait=wait)
        return records

    def resae_discard(self, key: str) -> None:
        """Drop the monitoring results of an aborted request (now and when they arrive)."""
        _hook().monitor.discard(key)

    def resae_info(self) -> dict[str, Any]:
        """What the front end needs to validate specs: layers, ``d_sae`` per layer, ``d_model``,
        and the number of distinct steering configs the tables hold."""
        tables = _hook().tables
        return {"layers": list(tables.layers), "d_model": tables.resae.d_model,
                "d_sae": [int(sae.W_dec.shape[0]) for sae in tables.resae.saes],
                "max_configs": (tables.max_rows - 1) // 2}

    def resae_stats(self) -> dict[str, float]:
        """Counters: table rows and requests, monitor health, and the time split of the forward
        passes since start (``forward_s`` in all, ``hook_host_s`` on the host, ``op_s`` in the
        op at every layer), and how many edited-feature reads the bfloat16 screen left to
        exact resolution."""
        hook = _hook()
        screens = [s for s in hook.tables.screens if s is not None]
        return {"rows_in_use": hook.tables.rows_in_use,
                "requests": len(hook.tables.known_requests()),
                "rejected": hook.rejected, "monitor_stalled_steps": hook.monitor.stalled_steps,
                "monitor_recomputed": hook.monitor.recomputed,
                "monitor_stored_requests": hook.monitor.stored_keys,
                "steps": hook.times.steps, "forward_s": hook.times.forward_seconds,
                "hook_host_s": hook.times.host_seconds, "op_s": hook.tables.op_seconds,
                "screened_reads": sum(s.reads for s in screens),
                "screened_reads_resolved_exactly": sum(s.reads_resolved_exactly
                                                       for s in screens)}
