"""The ReSAE hook on vLLM's own model class for the model's architecture (any supported family).

:func:`resae_serve.engine.llm.engine_kwargs` asks vLLM (``hf_overrides["architectures"]``) to
build, for the model's architecture ``Arch``, the class ``Resae<Arch>`` of this module: a
subclass of
the very class vLLM registers for ``Arch`` (its native implementation, or its Transformers
backend for GPT-NeoX and OLMo-2), so weights load exactly as in plain vLLM. After the base
class has built its modules, and before vLLM compiles anything, the decoder blocks at the
dictionary's layers get a subclass of their own class whose ``forward`` ends in
``resae::steer``: the op is inside the traced graph, and parameter names do not change.

The block output the op sees is what the dictionary was trained on (Hugging Face
``hidden_states[layer + 1]``; the last block before the final norm):
- a block that returns ``(hidden, residual)`` defers its residual add into the next fused
  add+norm (vLLM's Llama, Mistral, Qwen2/3, Gemma-2/3, Phi-3): the output is
  ``hidden + residual``, and the op edits ``hidden`` so the delta reaches the stream;
- a block that returns one tensor (Transformers-backend blocks, ``(1, n, d)``) returns its
  output: the op edits it in place.
``tests/integration/test_families.py`` checks each family against Hugging Face.

The outer ``forward`` (not compiled) runs the host-side step preparation around the compiled
decoder stack. See docs/ARCHITECTURE.md for the data flow of one request.
"""

from __future__ import annotations

import importlib
import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig

from resae_serve.artifact import load_artifact
from resae_serve.blocks import block_list
from resae_serve.context import TrainingContext
from resae_serve.engine import op
from resae_serve.engine.encoders import MonitorEncoder, build_encoder
from resae_serve.engine.hook import StepHook
from resae_serve.engine.monitor import Monitor
from resae_serve.engine.tables import SteeringTables
from resae_serve.families import SUPPORTED_ARCHITECTURES, UnsupportedModelError

logger = logging.getLogger(__name__)
CLASS_PREFIX = "Resae"
DEFAULT_MAX_CONFIGS = 32

_hook: StepHook | None = None


def current_hook() -> StepHook | None:
    """The step hook of the model built in this process (``None`` before load)."""
    return _hook


def hooked_architecture(architecture: str) -> str:
    """The registered name of the hooked class for ``architecture`` (``Resae<Arch>``)."""
    return f"{CLASS_PREFIX}{architecture}"


def register_architectures() -> None:
    """Register ``Resae<Arch>`` for every supported architecture with vLLM's model registry of
    this process (lazily: nothing is imported until vLLM builds one). Called in the front end
    and, by importing the worker extension, in the engine's processes.

    A registered name of its own, not ``model_class_overrides`` for ``Arch``: vLLM caches the
    class per model folder and architecture name in each process, so an override would leak
    into a plain engine for the same folder in that process (and vice versa)."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for architecture in SUPPORTED_ARCHITECTURES:
        name = hooked_architecture(architecture)
        if name not in known:
            ModelRegistry.register_model(name, f"{__name__}:{name}")


def _torch_dtype(dtype: object) -> torch.dtype:
    """vLLM resolves ``dtype`` to a torch dtype before building the model; names for safety."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        str(dtype), torch.float32)


def _vllm_class(architecture: str) -> type[nn.Module]:
    """The class vLLM registers for ``architecture`` (before our override)."""
    from vllm.model_executor.models import registry

    module, name = registry._VLLM_MODELS[architecture]
    if "." not in module:
        module = f"vllm.model_executor.models.{module}"
    cls: type[nn.Module] = getattr(importlib.import_module(module), name)
    return cls


def decoder_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The decoder blocks of a vLLM model (vLLM's ``layers``, the Transformers backend's
    ``gpt_neox.layers``, …), found by structure as capture finds them, not by name."""
    found = block_list(model, n_layers)
    if found is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no list of {n_layers} identical decoder blocks "
            "(pipeline parallelism splits the blocks over ranks; it is not supported by the "
            "hook)")
    return found[1]


def _steer_output(out: Any, index: int) -> Any:
    """Run ``resae::steer`` on a block's output; returns the output (edited in place)."""
    if isinstance(out, torch.Tensor):                 # the block output itself
        torch.ops.resae.steer(out.view(-1, out.shape[-1]), None, index)
        return out
    if (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
            and isinstance(out[1], torch.Tensor) and out[0].shape == out[1].shape):
        torch.ops.resae.steer(out[0], out[1], index)   # (hidden, residual): deferred add
        return out
    raise UnsupportedModelError(
        f"decoder block output of type {type(out).__name__} (length "
        f"{len(out) if isinstance(out, tuple) else '-'}): the ReSAE hook reads a tensor or "
        "(hidden, residual); this architecture is not supported")


_steerable_classes: dict[type[nn.Module], type[nn.Module]] = {}


def _steerable(block_cls: type[nn.Module]) -> type[nn.Module]:
    """``block_cls`` whose output passes through ``resae::steer`` at ``self.resae_index``
    (one subclass per block class)."""
    known = _steerable_classes.get(block_cls)
    if known is not None:
        return known

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _steer_output(block_cls.forward(self, *args, **kwargs), self.resae_index)

    steerable = type(f"Steerable{block_cls.__name__}", (block_cls,), {"forward": forward})
    _steerable_classes[block_cls] = steerable
    return steerable


def _load_tables(vllm_config: VllmConfig) -> tuple[SteeringTables, TrainingContext]:
    """The steering tables of the dictionary, and the context it was trained in."""
    hf_config = vllm_config.model_config.hf_config
    folder = getattr(hf_config, "resae_dictionary", None)
    if not folder:
        raise ValueError("the ReSAE model needs hf_overrides['resae_dictionary'] (a "
                         "dictionary folder)")
    resae, manifest = load_artifact(Path(folder))
    max_configs = int(getattr(hf_config, "resae_max_configs", DEFAULT_MAX_CONFIGS))
    body = getattr(hf_config, "resae_op_body", None)
    return SteeringTables(
        resae, max_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        max_rows=2 * max_configs + 1, dtype=_torch_dtype(vllm_config.model_config.dtype),
        screen=os.environ.get("RESAE_BF16_SCREEN", "1") != "0",
        device=torch.device(vllm_config.device_config.device_type),
        graph_body=None if body is None else body == "graph",
        context=manifest.context), manifest.context


def _monitor_encoder(hf_config: Any, tables: SteeringTables) -> MonitorEncoder:
    """The monitor's encoder for the runtime the front end chose (``resae_runtime``; torch
    when unset), over the export ``resae_export``."""
    return build_encoder(tables.resae, str(getattr(hf_config, "resae_runtime", "") or "torch"),
                         getattr(hf_config, "resae_export", "") or None,
                         device=str(tables.device),
                         provider=str(getattr(hf_config, "resae_runtime_provider", "") or "auto"),
                         reason=str(getattr(hf_config, "resae_runtime_reason", "") or ""))


class _ResaeMixin(nn.Module):
    """Loads the dictionary, builds the base model, puts the op on the dictionary's blocks,
    and runs the step hook around each forward pass."""

    base_architecture: str = ""
    """The Hugging Face architecture whose vLLM class this one extends."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        global _hook
        tables, context = _load_tables(vllm_config)
        op.install_tables(tables)
        _hook = StepHook(tables, Monitor(tables.resae, context=context, encoder=_monitor_encoder(
            vllm_config.model_config.hf_config, tables)))
        # The base class sees the architecture name it was registered for: vLLM's
        # Transformers backend looks up weight renamings by it (GPT-NeoX: embed_out -> lm_head).
        hf_config = vllm_config.model_config.hf_config
        hooked_name = hf_config.architectures
        hf_config.architectures = [self.base_architecture]
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            hf_config.architectures = hooked_name
        text_config = vllm_config.model_config.hf_text_config
        blocks = decoder_blocks(self, int(text_config.num_hidden_layers))
        for index, layer in enumerate(tables.layers):
            block: Any = blocks[layer]
            block.__class__ = _steerable(type(block))
            block.resae_index = index
        logger.info("ReSAE hook on %s blocks %s (%s mode), %d table rows on %s, %s op body, "
                    "bfloat16 screening of edited TopK features: %s", type(blocks[0]).__name__,
                    list(tables.layers), tables.resae.mode, tables.max_rows, tables.device,
                    "graph" if tables.graph_body else "eager",
                    any(s is not None for s in tables.screens))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        hook = _hook
        base = super().forward
        if hook is None or hook.outside_model:    # the runner-level wrapper runs the hook
            return base(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        return hook.around(int(positions.shape[-1]), lambda: base(
            input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs))


@cache
def hooked_class(architecture: str) -> type[nn.Module]:
    """``Resae<architecture>``: vLLM's class for ``architecture`` with the ReSAE hook."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {architecture!r} is not supported by the "
                                    f"ReSAE hook; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    base = _vllm_class(architecture)
    return type(hooked_architecture(architecture), (_ResaeMixin, base),
                {"__module__": __name__, "__doc__": f"{base.__name__} with the ReSAE hook.",
                 "base_architecture": architecture})


def __getattr__(name: str) -> type[nn.Module]:
    """vLLM's registry imports ``resae_serve.engine.model:Resae<Arch>`` by name."""
    if name.startswith(CLASS_PREFIX) and name[len(CLASS_PREFIX):] in SUPPORTED_ARCHITECTURES:
        return hooked_class(name[len(CLASS_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
