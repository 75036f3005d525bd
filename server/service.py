"""The ``resae.v1.ResaeService`` servicer: validate → convert → delegate → convert back.

Thin on purpose: requests become engine specs in :mod:`~resae_serve.server.convert`, the
engine (a :class:`~resae_serve.engine.serving.ServingEngine`: the vLLM-backed
:class:`~resae_serve.engine.serving.ResaeEngine`, or a fake in tests) does the work, and errors
are left to :class:`~resae_serve.server.errors.ErrorInterceptor`. Calls made while the engine
loads, or after it failed, end ``UNAVAILABLE``; past ``limits.max_pending`` admitted calls they
end ``RESOURCE_EXHAUSTED`` at once (fail fast, never queue unboundedly). ``WatchEvents`` streams
the server-wide monitors' events from the :class:`~resae_serve.server.watch.WatchHub`; it does
not count against ``max_pending`` (it is long-lived and costs generation nothing) and works
while the engine loads or restarts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from resae_serve.artifact import Manifest
from resae_serve.catalog import Catalog, FeatureInfo
from resae_serve.engine.rpc import FeatureRuntimeInfo
from resae_serve.engine.serving import GenerationChunk, ServingEngine, TokenFeatures
from resae_serve.engine.spec import MonitorSpec, SamplingSpec
from resae_serve.evaluation.search import codes_from_activations, rank_features, text_token_ids
from resae_serve.export.runtime import FeatureRuntime
from resae_serve.resae import ReSAE
from resae_serve.server import convert
from resae_serve.server.config import ServerConfig
from resae_serve.server.convert import RequestError
from resae_serve.server.errors import ServiceError
from resae_serve.server.metrics import ServerMetrics
from resae_serve.server.v1 import resae_pb2 as pb
from resae_serve.server.v1 import resae_pb2_grpc
from resae_serve.server.watch import WatchHub

logger = logging.getLogger(__name__)
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
DEFAULT_HITS, MAX_HITS = 10, 100


def feature_message(info: FeatureInfo, *, full: bool) -> pb.Feature:
    """A catalog entry as a ``Feature`` (``full`` adds contexts and suppressed tokens)."""
    message = pb.Feature(layer=info.layer, feature=info.feature, label=info.label or "",
                         density=info.density, mean_activation=info.mean_activation,
                         max_activation=info.max_activation, promoted=info.promoted)
    if full:
        message.suppressed.extend(info.suppressed)
        message.contexts.extend(pb.FeatureContext(activation=c["activation"], text=c["text"])
                                for c in info.contexts)
    return message


class ResaeService(resae_pb2_grpc.ResaeServiceServicer):
    """Serves one model + dictionary; the engine is attached once it has loaded."""

    def __init__(self, config: ServerConfig, manifest: Manifest, tokenizer: Any,
                 vocab_size: int, metrics: ServerMetrics, catalog: Catalog | None,
                 watch_hub: WatchHub | None = None) -> None:
        self.config, self.limits, self.manifest = config, config.limits, manifest
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.metrics, self.catalog = metrics, catalog
        self.watch_hub = watch_hub
        """The server-wide monitors' hub (``WatchEvents``); None: not set up."""
        self.engine: ServingEngine | None = None
        self.failure: str | None = None
        self.pending = 0
        self.active_streams = 0
        self._resae: ReSAE | None = None
        self._resae_lock = threading.Lock()
        self._runtime: FeatureRuntime | None = None
        self._runtime_key: FeatureRuntimeInfo | None = None
        self._runtime_lock = threading.Lock()

    # ------------------------------------------------------------------ state

    def attach(self, engine: ServingEngine) -> None:
        self.engine, self.failure = engine, None

    def runtime_info(self) -> FeatureRuntimeInfo:
        """The feature runtime the engine's monitor encodes with, as its worker reports it
        (``torch`` for an engine that does not say, e.g. a test fake)."""
        info = getattr(self.engine, "feature_runtime", None)
        return info if isinstance(info, FeatureRuntimeInfo) else FeatureRuntimeInfo("torch")

    def feature_runtime(self) -> FeatureRuntime:
        """A feature runtime in this (front-end) process on the backend and export the
        engine's monitor uses, opened on first use: for encodes outside the engine (e.g.
        SearchFeatures' re-encode of raw activations), so they run what the monitor runs.
        Torch runs the dictionary itself."""
        info = self.runtime_info()
        with self._runtime_lock:
            if self._runtime is None or self._runtime_key != info:
                from resae_serve.export.runtime import RuntimeConfig, open_runtime

                if info.backend == "torch" or not info.export:
                    from resae_serve.export.backend_torch import TorchRuntime

                    self._runtime = TorchRuntime(self._dictionary(),
                                                 RuntimeConfig(backend="torch"))
                else:
                    # the monitor's thread settings: the engine holds the other cores
                    self._runtime = open_runtime(Path(info.export), RuntimeConfig(
                        backend=info.backend,
                        provider=info.provider or "auto",
                        device="cpu" if info.provider in ("", "cpu") else "cuda",
                        threads=info.threads, allow_spinning=False))
                self._runtime_key = info
            return self._runtime

    def fail(self, reason: str) -> None:
        """Mark the engine unusable: every later call ends UNAVAILABLE with ``reason``."""
        self.engine, self.failure = None, reason

    def _engine(self) -> ServingEngine:
        if self.engine is not None:
            return self.engine
        if self.failure is not None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the engine is down ({self.failure})"
                               "; this server is NOT_SERVING, retry on another replica")
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the engine is still loading; retry "
                           "when grpc.health.v1 reports SERVING")

    def check_engine(self) -> ServingEngine:
        """The engine, or :class:`ServiceError` UNAVAILABLE saying why there is none."""
        return self._engine()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a call as admitted (gRPC and HTTP share the bound); beyond
        ``limits.max_pending`` :class:`ServiceError` RESOURCE_EXHAUSTED."""
        if self.pending >= self.limits.max_pending:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.pending} requests in flight, the limit is "
                               f"{self.limits.max_pending} (max_pending); retry with backoff")
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    def _catalog(self) -> Catalog:
        if self.catalog is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this dictionary has no feature catalog; the operator builds it "
                               "with `resae features DICTIONARY --build`")
        return self.catalog

    def _prompt(self, message: pb.Input, max_new: int = 0) -> list[int]:
        ids = convert.input_token_ids(message, self.tokenizer, self.vocab_size, "input",
                                      self.limits.max_prompt_tokens)
        limit = self.config.engine.max_model_len
        if limit is not None and len(ids) + max_new > limit:  # None: the engine checks
            raise RequestError(f"input has {len(ids)} tokens and sampling.max_tokens is "
                               f"{max_new}: together above the model length {limit}; "
                               "shorten the prompt or ask for fewer tokens")
        return ids

    async def _run(self, ids: list[int], sampling: SamplingSpec, interventions: list[Any],
                   monitor: MonitorSpec | None, *, watched: bool = True
                   ) -> AsyncGenerator[GenerationChunk, None]:
        """One engine request; ``watched``: under the server-wide monitors (Generate; Inspect
        and SearchFeatures read prompts, they generate nothing to guard)."""
        engine = self._engine()
        engine.spec(interventions, monitor)          # INVALID_ARGUMENT before any output
        request_id = f"resae-{uuid.uuid4().hex[:16]}"
        stream = engine.generate(ids, sampling, interventions=interventions, monitor=monitor,
                                 request_id=request_id, watched=watched)
        try:
            async for chunk in stream:
                yield chunk
        finally:        # aborts and releases at once, not when the generator is collected
            await stream.aclose()

    # ------------------------------------------------------------------ RPCs

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        received = time.perf_counter()
        self._engine()
        with self.admit():
            sampling = convert.sampling_spec(request.sampling, self.limits)
            ids = self._prompt(request.input, sampling.max_tokens)
            interventions = convert.interventions(request.interventions, self.limits)
            monitor = (convert.monitor_spec(request.monitor, self.limits)
                       if request.HasField("monitor") else None)
            stream = self._run(ids, sampling, interventions, monitor)
            self.active_streams += 1
            self.metrics.active_streams.labels(protocol="grpc").inc()
            n_out, first_token_at, last_token_at, text = 0, None, received, []
            n_first = 0                         # tokens that came with the first token chunk
            finish_reason, guardrail = "", None
            delivered = {layer: -1 for layer in (monitor.layers if monitor else ())}
            try:                                # closes the engine stream however this ends
                first = await anext(stream)     # validation errors surface here
                yield pb.GenerateResponse(prompt=pb.PromptTokens(
                    request_id=first.request_id,
                    tokens=convert.token_messages(ids, 0, self.tokenizer)))
                chunk: GenerationChunk | None = first
                while chunk is not None:
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if first_token_at is None:
                            first_token_at, n_first = now, len(chunk.token_ids)
                            self.metrics.observe_first_token(now - received)
                        last_token_at = now
                        self.metrics.add_tokens(len(chunk.token_ids))
                    message = convert.chunk_message(chunk, len(ids) + n_out, self.tokenizer)
                    n_out += len(chunk.token_ids)
                    text.append(chunk.text)
                    if delivered:
                        for f in chunk.features:
                            delivered[f.layer] = max(delivered[f.layer], f.position)
                        # generated positions whose pass ran but whose features are not here
                        fed = len(ids) + n_out - 1
                        done = max(min(delivered.values()), len(ids) - 1)
                        self.metrics.monitor_lag.observe(max(0, fed - 1 - done))
                    if chunk.finished:
                        finish_reason = chunk.finish_reason or ""
                        guardrail = chunk.guardrail
                    yield pb.GenerateResponse(chunk=message)
                    chunk = None if chunk.finished else await anext(stream, None)
            finally:
                self.active_streams -= 1
                self.metrics.active_streams.labels(protocol="grpc").dec()
                await stream.aclose()
            first_token_at = first_token_at or last_token_at
            decode = last_token_at - first_token_at
            yield pb.GenerateResponse(summary=pb.GenerateSummary(
                finish_reason=finish_reason,
                prompt_tokens=len(ids), completion_tokens=n_out,
                time_to_first_token_s=first_token_at - received,
                total_time_s=last_token_at - received,
                decode_tokens_per_s=(n_out - n_first) / decode if decode > 0 else 0.0,
                text="".join(text),
                guardrail=None if guardrail is None else convert.event_message(guardrail)))

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.WatchEventsResponse]:
        if self.watch_hub is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "server-wide monitoring is not set up on this server")
        subscription = self.watch_hub.subscribe(request.monitors)
        try:                        # until the caller cancels or the server stops
            # Headers now, not with the first event: the caller's ``wait_for_connection()``
            # returns once it is subscribed (every later event reaches it).
            await context.send_initial_metadata(())
            while (message := await subscription.next()) is not None:
                yield message
        finally:
            subscription.close()

    async def Inspect(self, request: pb.InspectRequest,
                      context: grpc.aio.ServicerContext) -> pb.InspectResponse:
        self._engine()
        with self.admit():
            ids = self._prompt(request.input, 1)
            monitor = convert.monitor_spec(request.monitor, self.limits, require_layers=True)
            interventions = convert.interventions(request.interventions, self.limits,
                                                  phase="all")
            features, events = await self._prompt_features(ids, interventions, monitor)
            return pb.InspectResponse(tokens=convert.token_messages(ids, 0, self.tokenizer),
                                      features=convert.feature_messages(features),
                                      events=convert.event_messages(events))

    async def _prompt_features(self, ids: list[int], interventions: list[Any],
                               monitor: MonitorSpec) -> tuple[list[TokenFeatures], list[Any]]:
        features: list[TokenFeatures] = []
        events: list[Any] = []
        async for chunk in self._run(ids, SamplingSpec(max_tokens=1, temperature=0.0),
                                     interventions, monitor, watched=False):
            features += [f for f in chunk.features if f.position < len(ids)]
            events += [e for e in chunk.events if e.position < len(ids)]
        return features, events

    async def GetDictionary(self, request: pb.GetDictionaryRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetDictionaryResponse:
        m, lim = self.manifest, self.limits
        catalog_layers = set(self.catalog.layers) if self.catalog else set()
        return pb.GetDictionaryResponse(
            model=m.model.name, model_fingerprint=m.model.fingerprint, d_model=m.d_model,
            mode=m.mode, schema_version=m.schema_version, backend=self.runtime_info().backend,
            layers=[pb.DictionaryLayer(layer=layer, d_sae=c.d_sae, architecture=c.architecture,
                                       k=c.k or 0, scale=s, has_catalog=layer in catalog_layers)
                    for layer, c, s in zip(m.layers, m.sae_configs, m.scales, strict=True)],
            limits=pb.RequestLimits(max_tokens=lim.max_tokens,
                                    max_prompt_tokens=lim.max_prompt_tokens,
                                    max_edits=lim.max_edits, max_watch=lim.max_watch,
                                    max_top_k=lim.max_top_k))

    async def ListFeatures(self, request: pb.ListFeaturesRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListFeaturesResponse:
        catalog = self._catalog()
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise RequestError(f"page_size={request.page_size}; allowed 0..{MAX_PAGE_SIZE} "
                               f"(0 = {DEFAULT_PAGE_SIZE})")
        n = catalog.n_features(request.layer)                  # validates the layer
        ids = [i for i in range(n) if not request.labeled_only
               or catalog.feature(request.layer, i).label]
        start = _page_offset(request)
        page = ids[start:start + size]
        more = start + size < len(ids)
        return pb.ListFeaturesResponse(
            features=[feature_message(catalog.feature(request.layer, i), full=False)
                      for i in page],
            next_page_token=_page_token(request, start + size) if more else "",
            total_size=len(ids))

    async def GetFeature(self, request: pb.GetFeatureRequest,
                         context: grpc.aio.ServicerContext) -> pb.GetFeatureResponse:
        info = self._catalog().feature(request.layer, request.feature)
        return pb.GetFeatureResponse(feature=feature_message(info, full=True))

    async def SearchFeatures(self, request: pb.SearchFeaturesRequest,
                             context: grpc.aio.ServicerContext) -> pb.SearchFeaturesResponse:
        catalog = self._catalog()
        if not request.text.strip():
            raise RequestError("text is empty; give some text to search for")
        if len(request.text) > self.limits.max_search_chars:
            raise RequestError(f"text has {len(request.text)} characters; at most "
                               f"{self.limits.max_search_chars} (max_search_chars)")
        top = request.top or DEFAULT_HITS
        if not 1 <= top <= MAX_HITS:
            raise RequestError(f"top={request.top}; allowed 0..{MAX_HITS} (0 = {DEFAULT_HITS})")
        layers = tuple(request.layers) or None
        for layer in layers or ():
            if layer not in catalog.layers:
                raise RequestError(f"layers: layer={layer} is not in the catalog; its layers "
                                   f"are {list(catalog.layers)}")
        self._engine()
        with self.admit():
            ids = text_token_ids(self.tokenizer, request.text)
            if len(ids) > self.limits.max_prompt_tokens:
                raise RequestError(f"text has {len(ids)} tokens; at most "
                                   f"{self.limits.max_prompt_tokens} (max_prompt_tokens)")
            self._prompt(pb.Input(token_ids=pb.TokenIds(ids=ids)), 1)
            monitor = MonitorSpec(layers=self.manifest.layers, raw=True)
            features, _ = await self._prompt_features(ids, [], monitor)
            hits = await asyncio.to_thread(self._rank, ids, features, catalog, top, layers)
        return pb.SearchFeaturesResponse(hits=[
            pb.SearchHit(feature=feature_message(catalog.feature(h.layer, h.feature),
                                                 full=False),
                         score=h.score, mean_on_text=h.mean_on_text,
                         fires_on=[pb.FeatureValueOnToken(token=t, value=v)
                                   for t, v in h.fires_on])
            for h in hits])

    def _dictionary(self) -> ReSAE:
        """The served dictionary in this process, loaded on first use (once)."""
        with self._resae_lock:
            if self._resae is None:
                from resae_serve.artifact import load_artifact

                self._resae = load_artifact(self.config.dictionary)[0].eval()
            return self._resae

    def _rank(self, ids: list[int], features: list[TokenFeatures], catalog: Catalog, top: int,
              layers: tuple[int, ...] | None) -> list[Any]:
        resae = self._dictionary()
        by_layer: dict[int, list[tuple[int, tuple[float, ...], int]]] = {}
        for f in features:
            by_layer.setdefault(f.layer, []).append((f.position, f.raw, f.out_of_distribution))
        acts, reasons = [], []
        for layer in self.manifest.layers:
            rows = sorted(by_layer.get(layer, ()))
            if len(rows) != len(ids):
                raise RuntimeError(f"engine returned {len(rows)} activations of layer {layer} "
                                   f"for {len(ids)} tokens")
            acts.append(torch.tensor([r for _, r, _ in rows], dtype=torch.float32))
            reasons.append(np.array([ood for _, _, ood in rows]))
        # the monitor's own flags: search scores exactly the positions Inspect reports unflagged
        # encoded by the runtime the monitor uses (the export on onnxruntime), torch otherwise
        runtime = None if self.runtime_info().backend == "torch" else self.feature_runtime()
        encoded = codes_from_activations(resae, self.tokenizer, ids, acts, reasons=reasons,
                                         runtime=runtime)
        return rank_features(encoded, catalog, top=top, layers=layers)


def _page_token(request: pb.ListFeaturesRequest, offset: int) -> str:
    blob = json.dumps({"layer": request.layer, "labeled": request.labeled_only,
                       "offset": offset}, separators=(",", ":"))
    return base64.urlsafe_b64encode(blob.encode()).decode()


def _page_offset(request: pb.ListFeaturesRequest) -> int:
    if not request.page_token:
        return 0
    try:
        if len(request.page_token) > 256:
            raise ValueError("too long")
        data = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
        offset = int(data["offset"])
        same = data["layer"] == request.layer and data["labeled"] == request.labeled_only
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise RequestError("page_token is not one this server issued; pass the "
                           "next_page_token of the previous response, or '' to start") from exc
    if not same or offset < 0:
        raise RequestError("page_token belongs to a different layer or filter; start again "
                           "with page_token=''")
    return offset
