"""vLLM's own OpenAI-compatible application over a :class:`~.serving.ResaeEngine`.

:func:`build_openai_app` builds vLLM's FastAPI app (``build_app`` / ``init_app_state``, no
copy of its endpoints) in this process, on the engine the gRPC API uses. The app talks to
the engine through :class:`SteeringEngineClient`, a proxy of vLLM's ``AsyncLLM`` whose
``generate`` steers and monitors the request the HTTP front end parsed (an
:class:`HttpRequest`, handed over in the context variable :data:`CURRENT`):

- a request without steering or monitoring passes through unchanged (it shares the plain
  prefix cache);
- a steered or monitored one runs through :meth:`~.serving.ResaeEngine.steered` (the same
  admission, salting, feature fetching, abort and release as a gRPC call) and leaves the
  features of every output in :attr:`HttpRequest.pending`, keyed by choice index, before vLLM
  turns that output into response chunks;
- a client's own ``vllm_xargs`` key ``resae`` is refused (it would reach the worker
  unvalidated).

Errors raised when ``generate`` is called (before any response byte) become vLLM's HTTP 400s,
also for streams. vLLM is imported only inside the functions here.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resae_serve.engine.llm import cache_salt_for
from resae_serve.engine.rpc import MonitorEvent
from resae_serve.engine.spec import EXTRA_ARGS_KEY, MonitorSpec, SteerEdit, SteerVector

if TYPE_CHECKING:
    from resae_serve.engine.serving import ResaeEngine, Step, TokenFeatures

logger = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ROUTES = frozenset({("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                    ("GET", "/v1/models")})
"""The routes of vLLM's app this server exposes; everything else is 404."""


@dataclass
class HttpRequest:
    """One HTTP request's steering, monitoring and results (project types only)."""

    interventions: tuple[SteerEdit | SteerVector, ...] = ()
    monitor: MonitorSpec | None = None
    max_prompt_tokens: int | None = None
    """Longest prompt, in tokens, after vLLM's rendering (chat template)."""
    pending: dict[int, list[tuple[list[TokenFeatures], list[MonitorEvent]]]] = field(
        default_factory=dict)
    """Features and events not yet written into a response, by choice index."""
    tokens: int = 0
    """Tokens generated so far over every choice."""
    first_token_at: float | None = None
    """``time.perf_counter()`` when the first token arrived."""
    calls: int = 0
    """Engine requests started so far (the next one's choice index)."""

    @property
    def monitoring(self) -> bool:
        return self.monitor is not None and bool(self.monitor.layers)

    @property
    def steering(self) -> bool:
        return bool(self.interventions) or self.monitoring

    def take(self, index: int) -> tuple[list[TokenFeatures], list[MonitorEvent]] | None:
        """Pop everything pending for choice ``index``; ``None`` when nothing is."""
        parts = self.pending.pop(index, None)
        if parts is None:
            return None
        return [f for fs, _ in parts for f in fs], [e for _, es in parts for e in es]

    def count(self, n: int) -> None:
        """Count ``n`` newly generated tokens."""
        if n > 0 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens += n


CURRENT: contextvars.ContextVar[HttpRequest | None] = contextvars.ContextVar(
    "resae_http_request", default=None)
"""The request the HTTP front end is serving in this task."""


def _refuse(message: str, parameter: str, value: Any = None) -> Exception:
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=parameter, value=value)


class SteeringEngineClient:
    """vLLM's ``AsyncLLM`` with ``generate`` steered per :data:`CURRENT` (everything else is
    the engine's own)."""

    def __init__(self, engine: ResaeEngine) -> None:
        self._engine: ResaeEngine | None = engine
        self._llm: Any = engine.driver.llm           # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        llm = self.__dict__.get("_llm")
        if llm is None:
            raise AttributeError(f"{name}: the engine behind this app is gone")
        return getattr(llm, name)

    def detach(self) -> None:
        """Drop the engine (it died or the server stopped), so that nothing vLLM's app keeps
        holds it in memory; later requests fail with 503."""
        self._engine = self._llm = None

    def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                 **kwargs: Any) -> AsyncIterator[Any]:
        """The engine's stream of ``RequestOutput`` s, steered by the current request."""
        if self._engine is None:
            from http import HTTPStatus

            from vllm.exceptions import GracefulHTTPError

            raise GracefulHTTPError("the engine stopped; retry on another replica",
                                    HTTPStatus.SERVICE_UNAVAILABLE)
        extra = getattr(sampling_params, "extra_args", None) or {}
        if EXTRA_ARGS_KEY in extra:
            raise _refuse(f"vllm_xargs.{EXTRA_ARGS_KEY} is reserved for this server; send "
                          "steering and monitoring in the body field 'resae'", "vllm_xargs")
        req = CURRENT.get()
        if req is None:                              # not through the front end
            return self._llm.generate(prompt, sampling_params, request_id, **kwargs)
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        limit = req.max_prompt_tokens
        if limit is not None and ids is not None and len(ids) > limit:
            raise _refuse(f"the prompt has {len(ids)} tokens; this server takes at most "
                          f"{limit} (max_prompt_tokens)", "prompt", len(ids))
        if not req.steering:
            return self._counted(self._llm.generate(prompt, sampling_params, request_id,
                                                    **kwargs), sampling_params, req)
        if req.monitoring and getattr(sampling_params, "n", 1) > 1:
            raise _refuse(f"n={sampling_params.n} with resae.monitor; monitoring takes n=1",
                          "n", sampling_params.n)
        if not isinstance(prompt, dict):
            raise _refuse("resae needs a text or token prompt", "prompt")
        from resae_serve.engine.serving import steering_spec

        # Server-wide monitors (the engine's guard policy) watch gRPC traffic only: the HTTP
        # path has no guardrail stop or held-back tokens yet, so it does not take them.
        spec = steering_spec(self._engine.info, req.interventions, req.monitor,
                             key=f"http-{uuid.uuid4().hex}")
        index, req.calls = req.calls, req.calls + 1
        params = sampling_params.clone()
        params.extra_args = {**extra, **spec.to_extra_args()}
        salted = {**prompt, "cache_salt": cache_salt_for(spec, prompt.get("cache_salt"))}
        steps = self._engine.steered(
            spec, request_id, lambda: self._llm.generate(salted, params, request_id, **kwargs))
        return self._run(steps, index, params, req)

    async def _run(self, steps: AsyncGenerator[Step, None],
                   index: int, params: Any, req: HttpRequest) -> AsyncGenerator[Any, None]:
        seen = _TokenCounter(params)
        try:
            async for step in steps:
                if req.monitoring:               # before vLLM turns the output into chunks
                    req.pending.setdefault(index, []).append((step.features, step.events))
                req.count(seen(step.out))
                yield step.out
        finally:
            await steps.aclose()

    async def _counted(self, stream: AsyncGenerator[Any, None], params: Any,
                       req: HttpRequest) -> AsyncGenerator[Any, None]:
        seen = _TokenCounter(params)
        try:
            async for out in stream:
                req.count(seen(out))
                yield out
        finally:
            await stream.aclose()


class _TokenCounter:
    """New tokens per ``RequestOutput``, whether vLLM sends deltas or cumulative outputs."""

    def __init__(self, params: Any) -> None:
        self.delta = getattr(getattr(params, "output_kind", None), "name", "") == "DELTA"
        self.seen: dict[int, int] = {}

    def __call__(self, out: Any) -> int:
        n = 0
        for o in out.outputs:
            total, index = len(o.token_ids), getattr(o, "index", 0)
            n += total if self.delta else total - self.seen.get(index, 0)
            self.seen[index] = total
        return max(n, 0)


class OpenAIApp:
    """vLLM's OpenAI app around one engine; call it with the request's :class:`HttpRequest`."""

    def __init__(self, app: Any, served_model_name: str,
                 client: SteeringEngineClient | None = None) -> None:
        self.app = app
        self.served_model_name = served_model_name
        self.client = client

    def close(self) -> None:
        """Let go of the engine (requests still in vLLM's app get 503)."""
        if self.client is not None:
            self.client.detach()

    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       request: HttpRequest) -> None:
        token = CURRENT.set(request)
        try:
            await self.app(scope, receive, send)
        finally:
            CURRENT.reset(token)


async def build_openai_app(engine: ResaeEngine, served_model_name: str) -> OpenAIApp:
    """vLLM's OpenAI-compatible app serving ``engine`` as ``served_model_name`` (vLLM's
    lifespan, signal handling and API-key middleware are left out; the caller runs it)."""
    import os

    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if os.environ.pop("VLLM_API_KEY", None) is not None:
        logger.warning("VLLM_API_KEY is ignored: the HTTP API uses this server's bearer tokens")
    client = SteeringEngineClient(engine)
    llm = engine.driver.llm                             # type: ignore[attr-defined]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    args.model = str(llm.model_config.model)
    args.served_model_name = [served_model_name]
    args.disable_fastapi_docs = True
    args.api_key = None
    args.disable_log_stats = True
    tasks = await llm.get_supported_tasks()
    app = build_app(args, tasks, llm.model_config)
    await init_app_state(client, app.state, args, tasks)  # type: ignore[arg-type]
    _drop_unexposed_route_metrics(app)
    tokenize_on_the_event_loop(llm.renderer)
    logger.info("OpenAI-compatible app ready for model %r", served_model_name)
    return OpenAIApp(app, served_model_name, client)


class InlineExecutor(Executor):
    """An executor that runs each call at once, in the calling thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:        # as concurrent.futures' own worker does
            future.set_exception(exc)
        return future


def tokenize_on_the_event_loop(renderer: Any) -> bool:
    """Make vLLM's renderer tokenize (and detokenize) on the event loop, as the gRPC servicer
    does, instead of in its one-thread pool; ``False`` (a warning, nothing changed) when this
    vLLM's renderer has no replaceable pool.

    The pool costs every HTTP request a hop to that thread and back. On a busy CPU the hop
    waits for the GIL and behind the other requests' handlers, so in a burst of 16
    one-token requests (2 cores) HTTP's median time to first token was 1.066 of gRPC's with
    the pool and 1.026 without (``benchmarks/RESULTS.md``). The price is the one the gRPC
    path already pays: a very long prompt's tokenization holds the loop while it runs."""
    pool = getattr(renderer, "_executor", None)
    if pool is None or not hasattr(pool, "_inner"):
        logger.warning("vLLM's renderer has no replaceable tokenizer pool here; HTTP "
                       "requests tokenize in vLLM's thread pool")
        return False
    old, pool._inner = pool._inner, InlineExecutor()
    if not isinstance(old, InlineExecutor):            # a second app on the same engine
        old.shutdown(wait=False)
    return True


def _drop_unexposed_route_metrics(app: Any) -> None:
    """Leave out vLLM's per-route HTTP metrics (prometheus-fastapi-instrumentator): they go
    to vLLM's registry, which this server does not expose (its own metrics count HTTP calls
    by protocol), and cost every request and every streamed chunk a pass through them."""
    app.user_middleware[:] = [m for m in app.user_middleware
                              if getattr(m.cls, "__name__", "") !=
                              "PrometheusInstrumentatorMiddleware"]
