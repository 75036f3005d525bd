"""The fuzz oracle: what status each resae.v1 request must end with, and the checks of a reply.

:class:`Oracle` decides, from the documented rules alone (``proto/resae/v1/resae.proto``, the
checks listed in ``server/convert.py`` / ``server/service.py`` and the engine's per-layer cap in
``resae_serve/engine/spec.py``), what status each request must end with: ``OK``,
``INVALID_ARGUMENT``, or ``RESOURCE_EXHAUSTED`` for a message above ``max_message_bytes``
(gRPC refuses it before the handler). It never imports the server's checks. Requests the
server is known to get wrong carry :attr:`Verdict.known_bug` (see :data:`KNOWN_BUGS`).
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError, Message

from resae_serve.server.v1 import resae_pb2 as pb
from tests.integration.fuzz_strategies import (
    INVALID,
    OK,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    SERVICE,
    SHAPE,
    TOO_BIG,
    ServerShape,
)

KNOWN_BUGS: dict[str, str] = {}
"""Server bugs the fuzzer found and that are not fixed yet: name -> what goes wrong. The three
it found first (temperature in (2, 100] -> INTERNAL from vLLM's SamplingParams; page tokens
with a non-finite offset or deeply nested JSON -> INTERNAL) are fixed and pinned by
``test_fixed_bugs_answer_invalid_argument``."""


# ----------------------------------------------------------------------------- oracle

class Verdict(NamedTuple):
    """What a request must end with, and why."""

    code: grpc.StatusCode
    reason: str
    """The first rule broken ("" for OK)."""
    known_bug: str | None = None
    """A :data:`KNOWN_BUGS` name when the server is known to answer this request wrongly."""
    prompt_tokens: int | None = None
    """Generate/Inspect: the prompt's length in tokens, when it could be counted."""
    max_new_tokens: int | None = None
    """Generate: the most tokens the stream may carry."""


class _Rules:
    """Collects broken rules; the first one is the verdict's reason."""

    def __init__(self) -> None:
        self.broken: list[str] = []

    def need(self, ok: bool, rule: str) -> bool:
        """Note ``rule`` as broken unless ``ok``; returns ``ok``."""
        if not ok:
            self.broken.append(rule)
        return ok

    def verdict(self, bug: str | None = None, **counts: int | None) -> Verdict:
        """INVALID_ARGUMENT with the first broken rule, else OK with ``counts``."""
        if self.broken:
            return Verdict(INVALID, self.broken[0], bug)
        return Verdict(OK, "", bug, **counts)


def _finite(x: float) -> bool:
    return math.isfinite(x)


class Oracle:
    """Decides each request's status from the documented rules (module docstring)."""

    def __init__(self, tokenizer: Any, shape: ServerShape = SHAPE) -> None:
        self.tokenizer, self.shape = tokenizer, shape

    def verdict(self, request: Message) -> Verdict:
        """The status ``request`` must end with (its RPC follows from its type)."""
        rpc = type(request).__name__.removesuffix("Request")
        if request.ByteSize() > self.shape.max_message_bytes:
            return Verdict(TOO_BIG, f"{request.ByteSize()} bytes > max_message_bytes")
        rules = _Rules()
        judge = getattr(self, f"_{rpc}")
        return judge(request, rules)

    def verdict_for_bytes(self, rpc: str, data: bytes) -> Verdict:
        """The status of ``data`` sent as ``rpc``'s request: size, then parse, then rules."""
        if len(data) > self.shape.max_message_bytes:
            return Verdict(TOO_BIG, f"{len(data)} bytes > max_message_bytes")
        try:
            request = REQUEST_TYPES[rpc].FromString(data)
        except DecodeError:
            return Verdict(INVALID, f"not a valid resae.v1.{rpc}Request message")
        return self.verdict(request)

    # ------------------------------------------------------------------ per RPC

    def _Generate(self, r: pb.GenerateRequest, rules: _Rules) -> Verdict:  # noqa: N802
        s, lim = r.sampling, self.shape
        rules.need(0 <= s.max_tokens <= lim.max_tokens, "sampling.max_tokens range")
        new = s.max_tokens or lim.default_max_tokens
        if s.HasField("temperature"):
            t = s.temperature
            rules.need(_finite(t) and 0 <= t <= lim.max_temperature, "sampling.temperature")
        if s.HasField("top_p"):
            rules.need(_finite(s.top_p) and 0 < s.top_p <= 1, "sampling.top_p")
        if s.HasField("top_k"):
            rules.need(s.top_k >= 0, "sampling.top_k")
        rules.need(len(s.stop) <= lim.max_stop, "sampling.stop count")
        rules.need(all(1 <= len(x) <= lim.max_stop_chars for x in s.stop), "sampling.stop length")
        bug = None
        n = self._input(r.input, new, rules)
        self._interventions(r.interventions, rules)
        if r.HasField("monitor"):
            self._monitor(r.monitor, rules, require_layers=False)
        return rules.verdict(bug, prompt_tokens=n, max_new_tokens=new)

    def _Inspect(self, r: pb.InspectRequest, rules: _Rules) -> Verdict:  # noqa: N802
        n = self._input(r.input, 1, rules)
        self._monitor(r.monitor, rules, require_layers=True)
        self._interventions(r.interventions, rules)
        return rules.verdict(prompt_tokens=n)

    def _GetDictionary(self, r: pb.GetDictionaryRequest, rules: _Rules) -> Verdict:  # noqa: N802
        return rules.verdict()

    def _ListFeatures(self, r: pb.ListFeaturesRequest, rules: _Rules) -> Verdict:  # noqa: N802
        size_ok = rules.need(0 <= r.page_size <= self.shape.max_page_size, "page_size")
        layer_ok = rules.need(r.layer in self.shape.layers, "layer not in the catalog")
        problem, bug = _page_token_problem(r.page_token, r.layer, r.labeled_only)
        rules.need(problem is None, f"page_token: {problem}")
        return rules.verdict(bug if size_ok and layer_ok else None)

    def _GetFeature(self, r: pb.GetFeatureRequest, rules: _Rules) -> Verdict:  # noqa: N802
        rules.need(r.layer in self.shape.layers, "layer not in the catalog")
        rules.need(0 <= r.feature < self.shape.d_sae, "feature out of range")
        return rules.verdict()

    def _SearchFeatures(self, r: pb.SearchFeaturesRequest, rules: _Rules) -> Verdict:  # noqa: N802
        lim = self.shape
        blank = not rules.need(bool(r.text.strip()), "text is blank")
        short = rules.need(len(r.text) <= lim.max_search_chars, "text too long (characters)")
        rules.need(0 <= r.top <= lim.max_hits, "top")
        rules.need(all(x in lim.layers for x in r.layers), "layers not in the catalog")
        if not blank and short:
            ids = self.tokenizer(r.text, add_special_tokens=False)["input_ids"]
            n = len(ids) + (self.tokenizer.bos_token_id is not None)
            rules.need(len(ids) > 0, "text has no tokens")
            rules.need(n <= lim.max_prompt_tokens and n + 1 <= lim.max_model_len,
                       "text too long (tokens)")
        return rules.verdict()

    # ------------------------------------------------------------------ parts

    def _input(self, message: pb.Input, new_tokens: int, rules: _Rules) -> int | None:
        """Check the input; its length in tokens when it could be counted."""
        kind, lim = message.WhichOneof("kind"), self.shape
        if kind is None:
            rules.need(False, "input unset")
            return None
        if kind == "prompt":
            if not rules.need(bool(message.prompt), "input.prompt empty"):
                return None
            n = len(self.tokenizer(message.prompt)["input_ids"])
        elif kind == "chat":
            turns = message.chat.messages
            roles = ("system", "user", "assistant")
            if not (rules.need(len(turns) > 0, "input.chat empty")
                    and rules.need(all(t.role in roles for t in turns), "input.chat role")):
                return None
            rendered = self.tokenizer.apply_chat_template(
                [{"role": t.role, "content": t.content} for t in turns],
                add_generation_prompt=True, tokenize=True)
            n = len(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        else:
            ids = message.token_ids.ids
            if not (rules.need(len(ids) > 0, "input.token_ids empty") and rules.need(
                    all(0 <= t < lim.vocab_size for t in ids), "input.token_ids range")):
                return None
            n = len(ids)
        rules.need(0 < n <= lim.max_prompt_tokens, "input too long (max_prompt_tokens)")
        rules.need(n + new_tokens <= lim.max_model_len, "input + max_tokens > max_model_len")
        return n

    def _interventions(self, items: Sequence[pb.Intervention], rules: _Rules) -> None:
        """Count, enums, oneof, finiteness, dictionary ranges, 8 feature edits per layer."""
        lim = self.shape
        rules.need(len(items) <= lim.max_edits, "interventions > max_edits")
        per_layer: Counter[int] = Counter()
        for m in items:
            rules.need(m.phase in (0, 1, 2, 3), "interventions[].phase")
            kind = m.WhichOneof("kind")
            rules.need(kind is not None, "interventions[] kind unset")
            if kind is not None:
                rules.need(m.layer in lim.layers, "interventions[].layer")
            if kind == "feature":
                rules.need(m.feature.mode in (1, 2, 3, 4), "interventions[].feature.mode")
                rules.need(_finite(m.feature.value), "interventions[].feature.value")
                rules.need(0 <= m.feature.feature < lim.d_sae, "interventions[].feature")
                per_layer[m.layer] += 1
            elif kind == "vector":
                rules.need(all(_finite(v) for v in m.vector.values), "vector not finite")
                rules.need(len(m.vector.values) == lim.d_model, "vector length")
        rules.need(all(n <= lim.edits_per_layer for n in per_layer.values()),
                   "feature edits per layer")

    def _monitor(self, m: pb.MonitorRequest, rules: _Rules, *, require_layers: bool) -> None:
        """Layers (unique, in the dictionary), top_k, watch, thresholds, something to report."""
        lim, chosen = self.shape, list(m.layers)
        if require_layers:
            rules.need(bool(chosen), "monitor.layers empty")
        rules.need(len(set(chosen)) == len(chosen), "monitor.layers repeats")
        rules.need(all(x in lim.layers for x in chosen), "monitor.layers")
        rules.need(0 <= m.top_k <= lim.max_top_k, "monitor.top_k")
        rules.need(len(m.watch) <= lim.max_watch, "monitor.watch count")
        rules.need(all(0 <= f < lim.d_sae for f in m.watch), "monitor.watch feature")
        rules.need(len(m.thresholds) <= lim.max_thresholds, "monitor.thresholds count")
        rules.need(not chosen or bool(m.top_k or m.watch or m.thresholds), "nothing to report")
        for t in m.thresholds:
            rules.need(_finite(t.value), "threshold value")
            rules.need(t.layer in chosen, "threshold layer not monitored")
            rules.need(0 <= t.feature < lim.d_sae, "threshold feature")


def _page_token_problem(token: str, layer: int, labeled: bool) -> tuple[str | None, str | None]:
    """(why ``token`` is not a page of ``layer``/``labeled``, known bug) — (None, None) if it
    is one: base64 JSON with that layer and filter and an integer offset >= 0."""
    if not token:
        return None, None
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
    except RecursionError:
        return "nested too deep", None
    except ValueError:
        return "not base64 JSON", None
    try:
        offset = int(data["offset"])
        same = data["layer"] == layer and data["labeled"] == labeled
    except OverflowError:
        return "offset is not finite", None
    except (KeyError, TypeError, ValueError):
        return "not a page token", None
    if not same or offset < 0:
        return "another layer or filter, or a negative offset", None
    return None, None


@functools.cache
def default_oracle() -> Oracle:
    """An :class:`Oracle` for the test server (loads the served model's tokenizer once)."""
    from transformers import AutoTokenizer

    from resae_serve.models import resolve_model

    return Oracle(AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")))


def expected_code(request: Message) -> grpc.StatusCode:
    """The status the test server must answer ``request`` with (see :class:`Oracle`)."""
    return default_oracle().verdict(request).code


# ----------------------------------------------------------------------------- calling

PATH = re.compile(r"(?<![\w.])/[\w.@-]+(?:/[\w.@-]+)+")
"""An absolute file path (two or more segments) in an error message."""


class Outcome(NamedTuple):
    """How one call ended."""

    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    """The serialized response(s) (one for unary RPCs, the stream for Generate)."""
    seconds: float


def send(channel: grpc.Channel, rpc: str, payload: Message | bytes,
         timeout: float = 60.0) -> Outcome:
    """Call ``rpc`` with a request or raw bytes (no client-side serialization or checks)."""
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    path, start = SERVICE + rpc, time.perf_counter()
    try:
        if rpc == "Generate":
            stream = channel.unary_stream(path, request_serializer=None,
                                          response_deserializer=None)
            responses = list(stream(data, timeout=timeout))
        else:
            unary = channel.unary_unary(path, request_serializer=None,
                                        response_deserializer=None)
            responses = [unary(data, timeout=timeout)]
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", [], time.perf_counter() - start)
    return Outcome(OK, "", responses, time.perf_counter() - start)


def problems(rpc: str, payload: Message | bytes, verdict: Verdict, outcome: Outcome) -> list[str]:
    """What is wrong with ``outcome`` for a request judged ``verdict`` ([] when all is well):
    the code, an error message that leaks internals, an OK stream without its summary."""
    if outcome.code != verdict.code:
        return [f"code {outcome.code.name} != expected {verdict.code.name} "
                f"({verdict.reason or 'valid'}): {outcome.details[:300]!r}"]
    found = []
    if outcome.code == INVALID:
        sent = (payload if isinstance(payload, bytes) else payload.SerializeToString())
        sent_text = sent.decode("utf-8", "replace")
        leaks = [s for s in ("Traceback", "/work", ".py", 'File "', *PATH.findall(outcome.details))
                 if s in outcome.details and s not in sent_text]
        if not outcome.details.strip() or leaks:
            found.append(f"INVALID_ARGUMENT message empty or leaking {leaks}: "
                         f"{outcome.details[:300]!r}")
    if outcome.code == OK and rpc == "Generate":
        stream = [pb.GenerateResponse.FromString(b) for b in outcome.responses]
        kinds = [m.WhichOneof("kind") for m in stream]
        if (len(kinds) < 2 or kinds[0] != "prompt" or kinds[-1] != "summary"
                or set(kinds[1:-1]) - {"chunk"}):
            found.append(f"Generate stream is {kinds}, not prompt, chunks, summary")
        else:
            summary = stream[-1].summary
            if verdict.prompt_tokens is not None and summary.prompt_tokens != verdict.prompt_tokens:
                found.append(f"summary.prompt_tokens={summary.prompt_tokens}, "
                             f"expected {verdict.prompt_tokens}")
            if summary.completion_tokens > (verdict.max_new_tokens or 0):
                found.append(f"summary.completion_tokens={summary.completion_tokens} > "
                             f"{verdict.max_new_tokens}")
    elif outcome.code == OK:
        reply = RESPONSE_TYPES[rpc].FromString(outcome.responses[0])
        if isinstance(reply, pb.InspectResponse) and verdict.prompt_tokens is not None \
                and len(reply.tokens) != verdict.prompt_tokens:
            found.append(f"Inspect returned {len(reply.tokens)} tokens, expected "
                         f"{verdict.prompt_tokens}")
    return found
