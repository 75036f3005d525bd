"""The ``resae::steer`` custom op: the one call the compiled model graph makes per ReSAE layer.

Registered with ``torch.library`` (through vLLM's ``direct_register_custom_op`` when vLLM is
importable, which skips ``custom_op``'s dispatch overhead). torch.compile / Inductor keep it
opaque: the graph around it stays compiled and fused, and at run time the op body
(:meth:`SteeringTables.apply`) reads the persistent tables that the host filled for this step.
It mutates ``hidden_states`` in place (declared in ``mutates_args``), which is how the
intervention reaches vLLM's deferred residual add.

On GPU the body is the tables' fixed-shape one by default: it reads only persistent device
tables and device-side flags, so vLLM's CUDA graphs (full decode graphs and piecewise ones)
capture it with the rest of the forward, and a replay sees the tables of that step. The
alternative, ``op_mode="split"`` in :func:`resae_serve.engine.llm.engine_kwargs`, lists the op
in ``splitting_ops`` and runs the variable-shape body eagerly between captured pieces
(:func:`resae_serve.engine.llm.compilation_config`). The timing below is host wall time; under
CUDA graphs it is not called at all (``op_seconds`` then stays 0).
"""

from __future__ import annotations

import time

import torch

from resae_serve.engine.tables import SteeringTables

OP_NAME = "steer"
_LIB = torch.library.Library("resae", "FRAGMENT")
_tables: SteeringTables | None = None


def install_tables(tables: SteeringTables | None) -> None:
    """Make ``tables`` the state the op reads (one model per worker process)."""
    global _tables
    _tables = tables


def current_tables() -> SteeringTables | None:
    return _tables


def steer(hidden_states: torch.Tensor, residual: torch.Tensor | None, layer_index: int) -> None:
    """Apply this step's interventions at dictionary layer ``layer_index`` (in place).

    ``residual`` is the stream vLLM has not yet added (deferred residual add: the block output
    is ``hidden_states + residual``), or ``None`` when ``hidden_states`` is the block output."""
    if _tables is not None:
        start = time.perf_counter()
        _tables.apply(layer_index, hidden_states, residual)
        _tables.op_seconds += time.perf_counter() - start


def _steer_fake(hidden_states: torch.Tensor, residual: torch.Tensor | None,
                layer_index: int) -> None:
    return None


def _register() -> None:
    if hasattr(torch.ops.resae, OP_NAME):
        return
    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:
        _LIB.define(f"{OP_NAME}(Tensor(a!) hidden_states, Tensor? residual, int layer_index) -> ()")
        _LIB.impl(OP_NAME, steer, "CompositeExplicitAutograd")
        _LIB._register_fake(OP_NAME, _steer_fake)
        return
    direct_register_custom_op(OP_NAME, steer, mutates_args=["hidden_states"],
                              fake_impl=_steer_fake, target_lib=_LIB)


_register()
