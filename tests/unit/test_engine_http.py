"""The engine side of the HTTP API (:mod:`resae_serve.engine.http`): the proxy of vLLM's
``AsyncLLM`` that steers and monitors the request the front end parsed, over the fake driver of
``test_engine_serving``, and the vLLM entry points the app is built from."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from resae_serve.engine.http import HttpRequest, InlineExecutor, tokenize_on_the_event_loop
from resae_serve.engine.spec import MonitorSpec, SteeringSpec


class FakeLLM:
    """vLLM's ``AsyncLLM.generate`` over the fake driver of ``test_engine_serving``."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.calls: list[tuple[dict[str, Any], Any]] = []

    def generate(self, prompt: dict[str, Any], params: Any, request_id: str,
                 **kwargs: Any) -> AsyncIterator[Any]:
        self.calls.append((prompt, params))
        spec = SteeringSpec.from_extra_args(params.extra_args)
        # the worker files monitor records under the spec's key, as the real hook does
        return self.driver.generate(prompt, None, spec or SteeringSpec(),
                                    spec.key if spec else request_id)


class Params(SimpleNamespace):
    def clone(self) -> Params:
        return Params(**vars(self))


def _proxy() -> tuple[Any, Any, FakeLLM]:
    pytest.importorskip("vllm", reason="the proxy raises vLLM's VLLMValidationError")
    from resae_serve.engine.http import SteeringEngineClient
    from resae_serve.engine.serving import ResaeEngine
    from tests.unit.test_engine_serving import INFO
    from tests.unit.test_engine_serving import FakeEngine as FakeDriver

    driver = FakeDriver()
    llm = FakeLLM(driver)
    driver.llm = llm
    engine = ResaeEngine(driver, INFO)
    return SteeringEngineClient(engine), engine, llm


def _drive(client: Any, request: HttpRequest, prompt: dict[str, Any], params: Params) -> list:
    from resae_serve.engine.http import CURRENT

    async def go() -> list[Any]:
        token = CURRENT.set(request)
        try:
            return [out async for out in client.generate(prompt, params, "cmpl-1-0")]
        finally:
            CURRENT.reset(token)
    return asyncio.run(go())


def test_proxy_refuses_reserved_xargs_and_long_prompts() -> None:
    from vllm.exceptions import VLLMValidationError

    client, _, llm = _proxy()
    request = HttpRequest(max_prompt_tokens=2)
    with pytest.raises(VLLMValidationError, match=r"vllm_xargs\.resae is reserved"):
        _drive(client, request, {"prompt_token_ids": [1]}, Params(extra_args={"resae": {}}))
    with pytest.raises(VLLMValidationError, match=r"the prompt has 3 tokens; .* at most 2"):
        _drive(client, request, {"prompt_token_ids": [1, 2, 3]}, Params(extra_args=None))
    monitored = HttpRequest(monitor=MonitorSpec((1,), top_k=1))
    with pytest.raises(VLLMValidationError, match=r"n=2 with resae\.monitor"):
        _drive(client, monitored, {"prompt_token_ids": [1]}, Params(extra_args=None, n=2))
    assert llm.calls == []


def test_proxy_passes_plain_requests_through_and_steers_the_others() -> None:
    client, engine, llm = _proxy()
    plain = HttpRequest()
    outs = _drive(client, plain, {"prompt_token_ids": [5, 6, 7]}, Params(extra_args=None))
    assert len(outs) == 3 and plain.tokens == 3 and plain.first_token_at is not None
    assert llm.calls[-1][0] == {"prompt_token_ids": [5, 6, 7]}      # unsalted, unsteered

    from resae_serve.engine.spec import SteerEdit

    edit = SteerEdit(1, 3, "add", 2.0, "all")
    steered = HttpRequest((edit,), MonitorSpec((1, 3), top_k=2))
    _drive(client, steered, {"prompt_token_ids": [5, 6, 7], "cache_salt": "mine"},
           Params(extra_args={"other": 1}, n=1))
    prompt, params = llm.calls[-1]
    spec = SteeringSpec.from_extra_args(params.extra_args)
    assert spec is not None and spec.edits == (edit,) and spec.key.startswith("http-")
    assert params.extra_args["other"] == 1
    assert prompt["cache_salt"].startswith(f"mine|resae-{spec.content_hash()[:32]}-monitor-")
    features, _ = steered.take(0) or ([], [])
    assert [(f.position, f.layer) for f in features] == [
        (p, layer) for p in range(5) for layer in (1, 3)]
    assert engine.resident_configs == 0 and engine.driver.aborted == []      # it finished


def test_the_vllm_entry_points_the_app_is_built_from_exist() -> None:
    """vLLM moves its server code between releases (0.32 moved it to ``launchers``)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    assert callable(build_app) and callable(init_app_state)
    for name in ("served_model_name", "disable_fastapi_docs", "api_key", "disable_log_stats"):
        assert hasattr(args, name), name


def test_inline_executor_runs_in_the_callers_thread_and_keeps_errors() -> None:
    done = InlineExecutor().submit(lambda a, b: (a + b, threading.get_ident()), 1, b=2)
    assert done.done() and done.result() == (3, threading.get_ident())
    failed = InlineExecutor().submit(lambda: 1 / 0)
    assert isinstance(failed.exception(), ZeroDivisionError)


def test_the_renderer_tokenizes_on_the_event_loop_where_it_can() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    renderer = SimpleNamespace(_executor=SimpleNamespace(_inner=pool))
    assert tokenize_on_the_event_loop(renderer)
    assert isinstance(renderer._executor._inner, InlineExecutor)
    with pytest.raises(RuntimeError, match="shutdown"):       # the old pool is let go
        pool.submit(print)
    assert tokenize_on_the_event_loop(renderer)                 # a second app on one engine
    assert not tokenize_on_the_event_loop(SimpleNamespace())    # another vLLM: left as is


def test_the_renderer_pool_this_code_replaces_exists() -> None:
    """``tokenize_on_the_event_loop`` reaches into vLLM's renderer (a private attribute):
    this fails when a vLLM upgrade moves it, rather than a warning at serve time."""
    pytest.importorskip("vllm")
    from vllm.renderers.base import _SwappableExecutor

    pool = _SwappableExecutor(max_workers=1)
    assert isinstance(pool._inner, ThreadPoolExecutor)
    pool.shutdown()
