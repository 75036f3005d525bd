"""The step hook around a runner-level model wrapper (vLLM's full CUDA graphs replay the whole
forward, so the hook cannot run inside the model there). No vLLM: a stand-in runner."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from resae_serve.engine.hook import StepHook
from resae_serve.engine.monitor import Monitor
from resae_serve.engine.spec import SteerEdit, SteeringSpec
from resae_serve.engine.tables import SteeringTables
from tests.unit.resae_fixtures import LAYERS, tiny_resae


class _GraphWrapper:
    """Shape of vLLM's ``CUDAGraphWrapper``: ``runnable`` and ``__call__``."""

    def __init__(self, tables: SteeringTables) -> None:
        self.tables = tables
        self.seen_active: list[bool] = []
        self.runnable = self

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, **_: Any) -> str:
        self.seen_active.append(self.tables.active)
        return "logits"

    def compute_logits(self) -> str:
        return "delegated"


def _runner(spec: SteeringSpec | None, tables: SteeringTables) -> SimpleNamespace:
    params = SimpleNamespace(extra_args=None if spec is None else spec.to_extra_args())
    return SimpleNamespace(
        model=_GraphWrapper(tables),
        requests={"a": SimpleNamespace(sampling_params=params)},
        input_batch=SimpleNamespace(req_ids=["a"], num_computed_tokens_cpu=np.array([0]),
                                    num_prompt_tokens=np.array([4])),
        query_start_loc=SimpleNamespace(np=np.array([0, 4])))


def test_hook_runs_around_a_graphed_model_call() -> None:
    tables = SteeringTables(tiny_resae(), max_tokens=8, max_rows=3, graph_body=True)
    hook = StepHook(tables, Monitor(tables.resae))
    runner = _runner(SteeringSpec(edits=(SteerEdit(LAYERS[0], 1, "add", 1.0),)), tables)
    wrapper = runner.model
    hook.bind(runner)
    assert hook.outside_model and runner.model is not wrapper
    out = runner.model(input_ids=torch.zeros(6, dtype=torch.long),
                       positions=torch.arange(6))          # 4 tokens padded to 6
    assert out == "logits" and wrapper.seen_active == [True]
    assert tables.token_rows[:6].tolist()[4:] == [0, 0] and tables.token_rows[0] != 0
    assert hook.times.steps == 1
    assert runner.model.compute_logits() == "delegated"     # attributes pass through
    hook.bind(runner)                                       # binding again wraps once
    assert runner.model._inner is wrapper
