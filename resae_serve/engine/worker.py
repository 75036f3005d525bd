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

    def resae_stats(self) -> dict[str, int]:
        hook = _hook()
        return {"rows_in_use": hook.tables.rows_in_use,
                "requests": len(hook.tables.known_requests()),
                "rejected": hook.rejected, "monitor_inline_steps": hook.monitor.inline_steps}
