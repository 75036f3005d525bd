"""Client SDK of the resae.v1 gRPC API: request builders, a sync and an asyncio client.

    from resae_serve.server.client import ResaeClient, add, clamp, condition, monitor

    with ResaeClient("127.0.0.1:50051", token="...") as client:
        done = client.complete("The cat", max_tokens=20, temperature=0.0,
                               interventions=[add(12, 345, 4.0)], monitor=monitor([12], top_k=3))
        print(done.text)
        # a conditional edit: clamp 18:7 to 0 on the tokens where 12:345 reaches 4
        client.complete("The cat", interventions=[clamp(18, 7, 0.0, when=condition(12, 345, 4.0))])
        for event in client.watch_events(["toxicity"]):   # the server's monitors, all traffic
            print(event)

Methods return the proto messages (``resae_serve.server.v1.resae_pb2``); gRPC failures raise
``grpc.RpcError`` (``.code()``, ``.details()``), bad arguments ``ValueError`` and unusable TLS
files :class:`~resae_serve.server.tls.TLSConfigError`. Cancelling a ``generate`` stream
(closing the iterator, leaving the loop early) cancels the call, which aborts the request in
the engine.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeAlias

import grpc
import grpc.aio

from resae_serve.server.tls import channel_credentials
from resae_serve.server.v1 import resae_pb2 as pb
from resae_serve.server.v1.resae_pb2_grpc import ResaeServiceStub

DEFAULT_TARGET = "127.0.0.1:50051"
PHASES: Mapping[str, pb.Phase] = {
    "prompt": pb.PHASE_PROMPT, "generation": pb.PHASE_GENERATION, "all": pb.PHASE_ALL,
}
EDIT_MODES: Mapping[str, pb.EditMode] = {
    "add": pb.EDIT_MODE_ADD, "clamp": pb.EDIT_MODE_CLAMP, "scale": pb.EDIT_MODE_SCALE,
    "ablate": pb.EDIT_MODE_ABLATE,
}
ChatTurns = Sequence[tuple[str, str]] | Sequence[Mapping[str, str]]
WatchMessage: TypeAlias = pb.WatchedEvent | pb.EventsDropped
"""What ``watch_events`` yields: an event, or a notice of events dropped before the next."""


# ----------------------------------------------------------------------------- builders

def _choice(name: str, value: str, allowed: Mapping[str, Any]) -> Any:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(map(repr, allowed))}")
    return allowed[value]


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}; must be finite")
    return float(value)


def condition(layer: int, feature: int, value: float, *, sticky: bool = False,
              include_out_of_distribution: bool = False) -> pb.Condition:
    """A gate for an intervention's ``when``: it applies on the tokens where ``feature``'s code
    at ``layer`` (at or before the intervention's layer) is >= ``value``; ``sticky``: from the
    first such token on."""
    return pb.Condition(layer=layer, feature=feature, value=_finite("when.value", value),
                        sticky=sticky, include_out_of_distribution=include_out_of_distribution)


def edit(layer: int, feature: int, mode: str, value: float = 0.0,
         phase: str = "all", *, when: pb.Condition | None = None) -> pb.Intervention:
    """An edit of one feature; ``mode`` is "add", "clamp", "scale" or "ablate"; ``when``
    (:func:`condition`) gates it per token."""
    return pb.Intervention(
        layer=layer, phase=_choice("phase", phase, PHASES), when=when,
        feature=pb.FeatureEdit(feature=feature, mode=_choice("mode", mode, EDIT_MODES),
                               value=_finite("value", value)))


def add(layer: int, feature: int, value: float, phase: str = "all", *,
        when: pb.Condition | None = None) -> pb.Intervention:
    """Add ``value`` typical activations of the feature: h += value * s * d."""
    return edit(layer, feature, "add", value, phase, when=when)


def clamp(layer: int, feature: int, value: float, phase: str = "all", *,
          when: pb.Condition | None = None) -> pb.Intervention:
    """Pin the feature's code to ``value`` (the SAE error stays in h)."""
    return edit(layer, feature, "clamp", value, phase, when=when)


def scale(layer: int, feature: int, factor: float, phase: str = "all", *,
          when: pb.Condition | None = None) -> pb.Intervention:
    """Multiply the feature's code by ``factor``."""
    return edit(layer, feature, "scale", factor, phase, when=when)


def ablate(layer: int, feature: int, phase: str = "all", *,
           when: pb.Condition | None = None) -> pb.Intervention:
    """Remove the feature from the block output."""
    return edit(layer, feature, "ablate", 0.0, phase, when=when)


def vector(layer: int, values: Iterable[float], phase: str = "all", *,
           when: pb.Condition | None = None) -> pb.Intervention:
    """Add a raw d_model direction (not scaled) to the block output at ``layer``."""
    floats = [_finite("values[]", float(v)) for v in values]
    return pb.Intervention(layer=layer, phase=_choice("phase", phase, PHASES), when=when,
                           vector=pb.SteeringVector(values=floats))


def monitor(layers: Iterable[int], top_k: int = 0, watch: Iterable[int] = (),
            thresholds: Iterable[tuple[int, int, float]] = (), *,
            include_out_of_distribution: bool = False) -> pb.MonitorRequest:
    """Report the ``top_k`` features and the ``watch`` codes of every token at ``layers``;
    ``thresholds`` are (layer, feature, value) events, skipped at positions outside the
    dictionary's training distribution unless ``include_out_of_distribution``."""
    return pb.MonitorRequest(
        layers=list(layers), top_k=top_k, watch=list(watch),
        thresholds=[pb.Threshold(layer=layer, feature=feature, value=_finite("threshold", v))
                    for layer, feature, v in thresholds],
        include_out_of_distribution=include_out_of_distribution)


def make_input(prompt: str | None = None, chat: ChatTurns | None = None,
               token_ids: Iterable[int] | None = None) -> pb.Input:
    """The model's input from exactly one of a prompt, chat turns or token ids."""
    given = [name for name, v in (("prompt", prompt), ("chat", chat), ("token_ids", token_ids))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, chat, token_ids (got "
                         f"{', '.join(given) or 'none'})")
    if prompt is not None:
        return pb.Input(prompt=prompt)
    if token_ids is not None:
        return pb.Input(token_ids=pb.TokenIds(ids=list(token_ids)))
    assert chat is not None
    messages = []
    for i, turn in enumerate(chat):
        if isinstance(turn, Mapping):
            if set(turn) != {"role", "content"}:
                raise ValueError(f"chat[{i}] has keys {sorted(turn)}; allowed: role, content")
            role, content = turn["role"], turn["content"]
        else:
            role, content = turn
        messages.append(pb.ChatMessage(role=role, content=content))
    return pb.Input(chat=pb.ChatMessages(messages=messages))


def generate_request(
    prompt: str | None = None, *, chat: ChatTurns | None = None,
    token_ids: Iterable[int] | None = None, max_tokens: int = 0,
    temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
    seed: int | None = None, stop: Iterable[str] = (),
    interventions: Iterable[pb.Intervention] = (), monitor: pb.MonitorRequest | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; unset sampling options take the server's defaults."""
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, seed=seed, stop=list(stop))
    return pb.GenerateRequest(input=make_input(prompt, chat, token_ids), sampling=sampling,
                              interventions=list(interventions), monitor=monitor)


def inspect_request(prompt: str | None = None, *, chat: ChatTurns | None = None,
                    token_ids: Iterable[int] | None = None,
                    monitor: pb.MonitorRequest | None = None,
                    interventions: Iterable[pb.Intervention] = ()) -> pb.InspectRequest:
    """An InspectRequest (the server needs ``monitor`` with at least one layer)."""
    return pb.InspectRequest(input=make_input(prompt, chat, token_ids), monitor=monitor,
                             interventions=list(interventions))


# ----------------------------------------------------------------------------- results

@dataclass
class Completion:
    """A Generate stream collected: feed it the responses in order with :meth:`update`."""

    request_id: str = ""
    """Server request id (logs, metrics)."""
    prompt_tokens: list[pb.Token] = field(default_factory=list)
    """The prompt as the model read it, positions 0 .. P-1."""
    tokens: list[pb.Token] = field(default_factory=list)
    """Generated tokens, positions P, P+1, ..."""
    text: str = ""
    """The generated text (the summary's once it arrived)."""
    features: list[pb.TokenFeatures] = field(default_factory=list)
    """Monitored features by (position, layer), prompt positions first."""
    events: list[pb.FeatureEvent] = field(default_factory=list)
    """Threshold events."""
    summary: pb.GenerateSummary | None = None
    """Finish reason and timing; None until the stream ended."""

    def update(self, response: pb.GenerateResponse) -> str:
        """Add one stream message; returns the text it added ("" for non-chunks)."""
        kind = response.WhichOneof("kind")
        if kind == "prompt":
            self.request_id = response.prompt.request_id
            self.prompt_tokens.extend(response.prompt.tokens)
        elif kind == "chunk":
            chunk = response.chunk
            self.tokens.extend(chunk.tokens)
            self.text += chunk.text
            self.features.extend(chunk.features)
            self.events.extend(chunk.events)
            return chunk.text
        elif kind == "summary":
            self.summary = response.summary
            self.text = response.summary.text or self.text
        return ""

    @classmethod
    def collect(cls, responses: Iterable[pb.GenerateResponse]) -> Completion:
        """Collect a whole stream."""
        completion = cls()
        for response in responses:
            completion.update(response)
        return completion


def _watched(response: pb.WatchEventsResponse) -> Iterator[WatchMessage]:
    """A stream message as the SDK yields it: the drop count first (if any), then each event."""
    if response.HasField("dropped"):
        yield response.dropped
    yield from response.events


# ----------------------------------------------------------------------------- clients

class _ClientBase:
    """Connection settings shared by both clients."""

    def __init__(self, target: str, token: str | None, tls_ca: Path | None,
                 tls_cert: Path | None, tls_key: Path | None, timeout: float | None) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        tls = (tls_ca, tls_cert, tls_key) != (None, None, None)
        self._credentials = channel_credentials(tls_ca, tls_cert, tls_key) if tls else None

    def _options(self) -> dict[str, Any]:
        return {"metadata": self._metadata, "timeout": self.timeout}


class ResaeClient(_ClientBase):
    """Blocking client; TLS when any of ``tls_ca``/``tls_cert``/``tls_key`` is given, else
    plaintext. ``token`` is sent as a bearer token; ``timeout`` (s) is every call's deadline
    (for ``generate``, of the whole stream)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, timeout: float | None = None) -> None:
        super().__init__(target, token, tls_ca, tls_cert, tls_key, timeout)
        self._channel = (grpc.insecure_channel(target) if self._credentials is None
                         else grpc.secure_channel(target, self._credentials))
        self._stub = ResaeServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel (in-flight calls are cancelled)."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def generate(
        self, prompt: str | None = None, *, chat: ChatTurns | None = None,
        token_ids: Iterable[int] | None = None, max_tokens: int = 0,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        seed: int | None = None, stop: Iterable[str] = (),
        interventions: Iterable[pb.Intervention] = (), monitor: pb.MonitorRequest | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        """Stream a completion: PromptTokens, TokenChunks, then GenerateSummary."""
        request = generate_request(
            prompt, chat=chat, token_ids=token_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            interventions=interventions, monitor=monitor)
        return self.stream(request)

    def stream(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        """Send a prepared GenerateRequest (all options, e.g. ``sampling.ignore_eos``)."""
        call = self._stub.Generate(request, **self._options())
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream ended; aborts the request otherwise

    def complete(
        self, prompt: str | None = None, *, chat: ChatTurns | None = None,
        token_ids: Iterable[int] | None = None, max_tokens: int = 0,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        seed: int | None = None, stop: Iterable[str] = (),
        interventions: Iterable[pb.Intervention] = (), monitor: pb.MonitorRequest | None = None,
    ) -> Completion:
        """Generate and collect the whole stream (arguments as :meth:`generate`)."""
        return Completion.collect(self.generate(
            prompt, chat=chat, token_ids=token_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            interventions=interventions, monitor=monitor))

    def inspect(self, prompt: str | None = None, *, chat: ChatTurns | None = None,
                token_ids: Iterable[int] | None = None, monitor: pb.MonitorRequest | None = None,
                interventions: Iterable[pb.Intervention] = ()) -> pb.InspectResponse:
        """Per-token features of a prompt, no generation."""
        request = inspect_request(prompt, chat=chat, token_ids=token_ids, monitor=monitor,
                                  interventions=interventions)
        return self._stub.Inspect(request, **self._options())

    def get_dictionary(self) -> pb.GetDictionaryResponse:
        """The served model, dictionary layers and request limits."""
        return self._stub.GetDictionary(
            pb.GetDictionaryRequest(), **self._options())

    def list_features(self, layer: int, page_size: int = 0, page_token: str = "",
                      labeled_only: bool = False) -> pb.ListFeaturesResponse:
        """One page of a layer's catalog."""
        request = pb.ListFeaturesRequest(layer=layer, page_size=page_size, page_token=page_token,
                                         labeled_only=labeled_only)
        return self._stub.ListFeatures(request, **self._options())

    def iter_features(self, layer: int, page_size: int = 0,
                      labeled_only: bool = False) -> Iterator[pb.Feature]:
        """Every catalog entry of a layer, following the pages."""
        token = ""
        while True:
            page = self.list_features(layer, page_size, token, labeled_only)
            yield from page.features
            token = page.next_page_token
            if not token:
                return

    def get_feature(self, layer: int, feature: int) -> pb.GetFeatureResponse:
        """One feature's full catalog entry (contexts, suppressed tokens)."""
        request = pb.GetFeatureRequest(layer=layer, feature=feature)
        return self._stub.GetFeature(request, **self._options())

    def search_features(self, text: str, top: int = 0,
                        layers: Iterable[int] = ()) -> pb.SearchFeaturesResponse:
        """Features far more active on ``text`` than on held-out text."""
        request = pb.SearchFeaturesRequest(text=text, top=top, layers=list(layers))
        return self._stub.SearchFeatures(request, **self._options())

    def watch_events(self, monitors: Iterable[str] = (), *, timeout: float | None = None
                     ) -> Iterator[WatchMessage]:
        """Events of the server-wide ``monitors`` (empty: all) across all requests, as they
        happen, until the iterator is closed or the server stops: ``WatchedEvent`` s, and an
        ``EventsDropped`` before the next event when this reader fell behind. ``timeout`` is
        this call's deadline (the client's does not apply: a watch has no natural end)."""
        call = self._stub.WatchEvents(pb.WatchEventsRequest(monitors=list(monitors)),
                                      metadata=self._metadata, timeout=timeout)
        try:
            for response in call:
                yield from _watched(response)
        finally:
            call.cancel()


class AsyncResaeClient(_ClientBase):
    """The asyncio twin of :class:`ResaeClient` (``grpc.aio``); same arguments."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, timeout: float | None = None) -> None:
        super().__init__(target, token, tls_ca, tls_cert, tls_key, timeout)
        self._channel = (grpc.aio.insecure_channel(target) if self._credentials is None
                         else grpc.aio.secure_channel(target, self._credentials))
        self._stub = ResaeServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel (in-flight calls are cancelled)."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def generate(
        self, prompt: str | None = None, *, chat: ChatTurns | None = None,
        token_ids: Iterable[int] | None = None, max_tokens: int = 0,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        seed: int | None = None, stop: Iterable[str] = (),
        interventions: Iterable[pb.Intervention] = (), monitor: pb.MonitorRequest | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a completion (``async for``): PromptTokens, TokenChunks, GenerateSummary."""
        request = generate_request(
            prompt, chat=chat, token_ids=token_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            interventions=interventions, monitor=monitor)
        return self.stream(request)

    async def stream(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Send a prepared GenerateRequest (all options, e.g. ``sampling.ignore_eos``)."""
        call = self._stub.Generate(request, **self._options())
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def complete(
        self, prompt: str | None = None, *, chat: ChatTurns | None = None,
        token_ids: Iterable[int] | None = None, max_tokens: int = 0,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        seed: int | None = None, stop: Iterable[str] = (),
        interventions: Iterable[pb.Intervention] = (), monitor: pb.MonitorRequest | None = None,
    ) -> Completion:
        """Generate and collect the whole stream (arguments as :meth:`generate`)."""
        completion = Completion()
        async for response in self.generate(
                prompt, chat=chat, token_ids=token_ids, max_tokens=max_tokens,
                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                interventions=interventions, monitor=monitor):
            completion.update(response)
        return completion

    async def inspect(self, prompt: str | None = None, *, chat: ChatTurns | None = None,
                      token_ids: Iterable[int] | None = None,
                      monitor: pb.MonitorRequest | None = None,
                      interventions: Iterable[pb.Intervention] = ()) -> pb.InspectResponse:
        """Per-token features of a prompt, no generation."""
        request = inspect_request(prompt, chat=chat, token_ids=token_ids, monitor=monitor,
                                  interventions=interventions)
        return await self._stub.Inspect(request, **self._options())

    async def get_dictionary(self) -> pb.GetDictionaryResponse:
        """The served model, dictionary layers and request limits."""
        return await self._stub.GetDictionary(
            pb.GetDictionaryRequest(), **self._options())

    async def list_features(self, layer: int, page_size: int = 0, page_token: str = "",
                            labeled_only: bool = False) -> pb.ListFeaturesResponse:
        """One page of a layer's catalog."""
        request = pb.ListFeaturesRequest(layer=layer, page_size=page_size, page_token=page_token,
                                         labeled_only=labeled_only)
        return await self._stub.ListFeatures(
            request, **self._options())

    async def iter_features(self, layer: int, page_size: int = 0,
                            labeled_only: bool = False) -> AsyncIterator[pb.Feature]:
        """Every catalog entry of a layer, following the pages (``async for``)."""
        token = ""
        while True:
            page = await self.list_features(layer, page_size, token, labeled_only)
            for feature in page.features:
                yield feature
            token = page.next_page_token
            if not token:
                return

    async def get_feature(self, layer: int, feature: int) -> pb.GetFeatureResponse:
        """One feature's full catalog entry (contexts, suppressed tokens)."""
        request = pb.GetFeatureRequest(layer=layer, feature=feature)
        return await self._stub.GetFeature(request, **self._options())

    async def search_features(self, text: str, top: int = 0,
                              layers: Iterable[int] = ()) -> pb.SearchFeaturesResponse:
        """Features far more active on ``text`` than on held-out text."""
        request = pb.SearchFeaturesRequest(text=text, top=top, layers=list(layers))
        return await self._stub.SearchFeatures(
            request, **self._options())

    async def watch_events(self, monitors: Iterable[str] = (), *,
                           timeout: float | None = None) -> AsyncIterator[WatchMessage]:
        """Events of the server-wide monitors (``async for``); as
        :meth:`ResaeClient.watch_events`."""
        call = self._stub.WatchEvents(pb.WatchEventsRequest(monitors=list(monitors)),
                                      metadata=self._metadata, timeout=timeout)
        try:
            async for response in call:
                for message in _watched(response):
                    yield message
        finally:
            call.cancel()
