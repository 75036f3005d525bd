"""ReSAE steering and monitoring inside vLLM V1 (CPU and GPU model runners).

- :mod:`~resae_serve.engine.spec`: per-request specs, validation, wire form, cache salt.
- :mod:`~resae_serve.engine.tables`: persistent tables and the per-layer math (no vLLM).
- :mod:`~resae_serve.engine.op`: the ``resae::steer`` custom op the compiled graph calls.
- :mod:`~resae_serve.engine.model`, :mod:`~resae_serve.engine.worker`: the vLLM side.
- :mod:`~resae_serve.engine.llm`: building an engine and running offline batches.
- :mod:`~resae_serve.engine.serving`: the async ``generate`` wrapper (admission, features,
  events); :mod:`~resae_serve.engine.driver` drives an offline ``LLM`` through it.
- :mod:`~resae_serve.engine.http`: vLLM's own OpenAI-compatible app over that engine, steered
  and monitored per request.
"""

from resae_serve.engine.spec import (
    MonitorSpec,
    SteerEdit,
    SteeringSpec,
    SteerVector,
    Threshold,
)

__all__ = ["MonitorSpec", "SteerEdit", "SteerVector", "SteeringSpec", "Threshold"]
