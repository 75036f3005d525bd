"""``ResaeLlamaForCausalLM``: vLLM's Llama with the ``resae::steer`` op after each ReSAE layer.

Selected by ``hf_overrides={"architectures": ["ResaeLlamaForCausalLM"],
"resae_dictionary": folder}`` (see :func:`resae_serve.engine.llm.build_llm`). The decoder
layers are built as :class:`SteerableLlamaDecoderLayer` at construction, before vLLM compiles
``LlamaModel``, so the op is inside the traced graph; parameter names do not change, so vLLM's
weight loading is untouched. The outer ``forward`` (not compiled) runs the host-side step
preparation around the compiled decoder stack.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from resae_serve.artifact import load_artifact
from resae_serve.engine import op
from resae_serve.engine.hook import StepHook
from resae_serve.engine.monitor import Monitor
from resae_serve.engine.tables import SteeringTables

logger = logging.getLogger(__name__)
ARCHITECTURE = "ResaeLlamaForCausalLM"
DEFAULT_MAX_CONFIGS = 32

_hook: StepHook | None = None


def current_hook() -> StepHook | None:
    """The step hook of the model built in this process (``None`` before load)."""
    return _hook


def _dictionary_layers(vllm_config: VllmConfig) -> tuple[int, ...]:
    tables = op.current_tables()
    return tables.layers if tables is not None else ()


def _torch_dtype(dtype: object) -> torch.dtype:
    """vLLM resolves ``dtype`` to a torch dtype before building the model; names for safety."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        str(dtype), torch.float32)


class SteerableLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama block whose output (``hidden + residual``) passes through ``resae::steer``."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        layer = int(prefix.rsplit(".", 1)[-1])
        layers = _dictionary_layers(vllm_config)
        self.resae_index = layers.index(layer) if layer in layers else -1

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = super().forward(positions, hidden_states, residual)
        if self.resae_index >= 0:
            torch.ops.resae.steer(hidden_states, residual, self.resae_index)
        return hidden_states, residual


class ResaeLlamaForCausalLM(LlamaForCausalLM):
    """Llama with persistent ReSAE steering tables (see module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        global _hook
        hf_config = vllm_config.model_config.hf_config
        folder = getattr(hf_config, "resae_dictionary", None)
        if not folder:
            raise ValueError(f"{ARCHITECTURE} needs hf_overrides['resae_dictionary'] (a "
                             "dictionary folder)")
        resae, _ = load_artifact(Path(folder))
        max_configs = int(getattr(hf_config, "resae_max_configs", DEFAULT_MAX_CONFIGS))
        tables = SteeringTables(
            resae, max_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            max_rows=2 * max_configs + 1, dtype=_torch_dtype(vllm_config.model_config.dtype),
            screen=os.environ.get("RESAE_BF16_SCREEN", "1") != "0")
        op.install_tables(tables)
        _hook = StepHook(tables, Monitor(resae))
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=SteerableLlamaDecoderLayer)
        logger.info("ReSAE hook at layers %s (%s mode), %d table rows, bfloat16 screening of "
                    "edited TopK features: %s", list(resae.layers), resae.mode, tables.max_rows,
                    any(s is not None for s in tables.screens))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        hook = _hook
        if hook is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                                   **kwargs)
        start = time.perf_counter()
        hook.before_forward(int(positions.shape[-1]))
        host = time.perf_counter()
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                              **kwargs)
        done = time.perf_counter()
        hook.after_forward()
        hook.times.add(host - start + time.perf_counter() - done, time.perf_counter() - start)
        return out
