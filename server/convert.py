"""Proto messages → engine specs and back, with the request checks the engine cannot do.

Every check raises :class:`RequestError` whose message names the field as the client wrote
it (``interventions[1].feature.value``), the value and what is allowed; the error interceptor
turns it into ``INVALID_ARGUMENT``. Checks against the dictionary (layer, feature ranges) are
the engine's (:meth:`SteeringSpec.validate`), also ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from resae_serve.engine.serving import GenerationChunk, MonitorEvent, TokenFeatures
from resae_serve.engine.spec import (
    Condition,
    MonitorSpec,
    SamplingSpec,
    SteerEdit,
    SteerVector,
    Threshold,
)
from resae_serve.errors import ResaeError
from resae_serve.server.config import Limits
from resae_serve.server.v1 import resae_pb2 as pb

MODES = {pb.EDIT_MODE_ADD: "add", pb.EDIT_MODE_CLAMP: "clamp", pb.EDIT_MODE_SCALE: "scale",
         pb.EDIT_MODE_ABLATE: "ablate"}
PHASES = {pb.PHASE_UNSPECIFIED: "all", pb.PHASE_ALL: "all", pb.PHASE_PROMPT: "prompt",
          pb.PHASE_GENERATION: "generation"}
ROLES = ("system", "user", "assistant")
CHARS_PER_TOKEN_BOUND = 32
"""Characters per allowed prompt token beyond which text is refused without tokenizing."""
MAX_TEMPERATURE = 2.0
"""The engine's own bound on the sampling temperature."""


class RequestError(ResaeError):
    """A request field holds a value the server does not accept (→ INVALID_ARGUMENT)."""


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise RequestError(f"{where}={value}; must be a finite number")
    return float(value)


def _enum_name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def input_token_ids(message: pb.Input, tokenizer: Any, vocab_size: int, where: str,
                    max_tokens: int) -> list[int]:
    """The prompt's token ids (chat template for chat input), checked against the limits."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise RequestError(f"{where}: set one of {where}.prompt, {where}.chat, "
                           f"{where}.token_ids")
    max_chars = CHARS_PER_TOKEN_BOUND * max_tokens    # refuse megabytes before tokenizing
    if kind == "prompt":
        if not message.prompt:
            raise RequestError(f"{where}.prompt is empty; give some text")
        if len(message.prompt) > max_chars:
            raise RequestError(f"{where}.prompt has {len(message.prompt)} characters; this "
                               f"server takes at most {max_tokens} tokens (max_prompt_tokens)")
        ids = list(tokenizer(message.prompt)["input_ids"])
    elif kind == "chat":
        turns = message.chat.messages
        if not turns:
            raise RequestError(f"{where}.chat.messages is empty; give at least one turn")
        for i, turn in enumerate(turns):
            if turn.role not in ROLES:
                raise RequestError(f"{where}.chat.messages[{i}].role={turn.role!r}; allowed: "
                                   f"{', '.join(ROLES)}")
        if sum(len(t.content) for t in turns) > max_chars:
            raise RequestError(f"{where}.chat is longer than {max_tokens} tokens "
                               "(max_prompt_tokens)")
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": t.role, "content": t.content} for t in turns],
                add_generation_prompt=True, tokenize=True)
        except Exception as exc:   # jinja2 TemplateError, or a model without a chat template
            raise RequestError(f"{where}.chat: the model's chat template refused the messages "
                               f"({type(exc).__name__}: {exc})") from exc
        ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    else:
        ids = list(message.token_ids.ids)
        if not ids:
            raise RequestError(f"{where}.token_ids.ids is empty; give at least one id")
        for i, t in enumerate(ids):
            if not 0 <= t < vocab_size:
                raise RequestError(f"{where}.token_ids.ids[{i}]={t}; allowed "
                                   f"0..{vocab_size - 1}")
    if not ids:
        raise RequestError(f"{where} has no tokens")
    if len(ids) > max_tokens:
        raise RequestError(f"{where} has {len(ids)} tokens; this server takes at most "
                           f"{max_tokens} (max_prompt_tokens)")
    return ids


def sampling_spec(message: pb.SamplingParams, limits: Limits, *,
                  max_tokens: int | None = None) -> SamplingSpec:
    """The engine's :class:`SamplingSpec` for ``message`` (``max_tokens`` overrides it, e.g.
    Inspect). Unset fields keep the engine's defaults; values the engine itself refuses
    surface later as :class:`~resae_serve.errors.EngineRequestError` (also INVALID_ARGUMENT)."""
    n = max_tokens if max_tokens is not None else message.max_tokens
    if n < 0 or n > limits.max_tokens:
        raise RequestError(f"sampling.max_tokens={n}; allowed 0..{limits.max_tokens} "
                           "(0 = the server default)")
    n = n or limits.default_max_tokens
    kwargs: dict[str, Any] = {"max_tokens": n}
    if message.HasField("temperature"):
        t = _finite(message.temperature, "sampling.temperature")
        if not 0 <= t <= MAX_TEMPERATURE:
            raise RequestError(f"sampling.temperature={t}; allowed 0..{MAX_TEMPERATURE:g} "
                               "(0 = greedy)")
        kwargs["temperature"] = t
    if message.HasField("top_p"):
        p = _finite(message.top_p, "sampling.top_p")
        if not 0 < p <= 1:
            raise RequestError(f"sampling.top_p={p}; allowed (0, 1]")
        kwargs["top_p"] = p
    if message.HasField("top_k") and message.top_k != 0:
        if message.top_k < 0:
            raise RequestError(f"sampling.top_k={message.top_k}; allowed 0 (all) or >= 1")
        kwargs["top_k"] = message.top_k
    if message.HasField("seed"):
        kwargs["seed"] = message.seed
    if len(message.stop) > 16:
        raise RequestError(f"sampling.stop has {len(message.stop)} strings; at most 16")
    for i, s in enumerate(message.stop):
        if not s or len(s) > 256:
            raise RequestError(f"sampling.stop[{i}] has {len(s)} characters; allowed 1..256")
    if message.stop:
        kwargs["stop"] = tuple(message.stop)
    if message.ignore_eos:
        kwargs["ignore_eos"] = True
    return SamplingSpec(**kwargs)


def interventions(messages: Sequence[pb.Intervention], limits: Limits, *,
                  phase: str | None = None) -> list[SteerEdit | SteerVector]:
    """Engine interventions (``phase`` overrides every message's phase, e.g. Inspect)."""
    if len(messages) > limits.max_edits:
        raise RequestError(f"interventions has {len(messages)} entries; at most "
                           f"{limits.max_edits} (max_edits)")
    out: list[SteerEdit | SteerVector] = []
    for i, m in enumerate(messages):
        where = f"interventions[{i}]"
        if phase is None and m.phase not in PHASES:
            raise RequestError(f"{where}.phase={m.phase}; allowed: "
                               f"{', '.join(pb.Phase.keys())}")
        ph = phase or PHASES[m.phase]    # Inspect: every token, whatever the phase says
        kind = m.WhichOneof("kind")
        if kind == "feature":
            if m.feature.mode not in MODES:
                raise RequestError(f"{where}.feature.mode="
                                   f"{_enum_name(pb.EditMode, m.feature.mode)}; allowed: "
                                   f"{', '.join(pb.EditMode.Name(k) for k in MODES)}")
            value = _finite(m.feature.value, f"{where}.feature.value")
            when = condition(m, where)
            out.append(SteerEdit(m.layer, m.feature.feature, MODES[m.feature.mode],  # type: ignore[arg-type]
                                 value, ph, when))  # type: ignore[arg-type]
        elif kind == "vector":
            values = m.vector.values
            for j, v in enumerate(values):
                if not math.isfinite(v):
                    raise RequestError(f"{where}.vector.values[{j}]={v}; must be finite")
            out.append(SteerVector(m.layer, tuple(float(v) for v in values), ph,  # type: ignore[arg-type]
                                   condition(m, where)))
        else:
            raise RequestError(f"{where}: set one of {where}.feature or {where}.vector")
    return out


def condition(message: pb.Intervention, where: str) -> Condition | None:
    """The engine :class:`Condition` of an intervention's ``when`` (None when unset); checks
    against the dictionary (layer and feature ranges) are the engine's."""
    if not message.HasField("when"):
        return None
    c = message.when
    if c.layer < 0 or c.layer > message.layer:
        raise RequestError(f"{where}.when.layer={c.layer}; a condition reads a layer at or "
                           f"before the intervention's layer {message.layer} (0..{message.layer})")
    if c.feature < 0:
        raise RequestError(f"{where}.when.feature={c.feature}; must be >= 0")
    value = _finite(c.value, f"{where}.when.value")
    return Condition(c.layer, c.feature, value, c.sticky, c.include_out_of_distribution)


def intervention_messages(items: Sequence[SteerEdit | SteerVector]) -> list[pb.Intervention]:
    """Engine interventions back as ``Intervention`` messages (what :func:`interventions`
    reads)."""
    phases = {"all": pb.PHASE_ALL, "prompt": pb.PHASE_PROMPT,
              "generation": pb.PHASE_GENERATION}
    modes = {name: enum for enum, name in MODES.items()}
    out = []
    for x in items:
        message = pb.Intervention(layer=x.layer, phase=phases[x.phase])
        if isinstance(x, SteerEdit):
            message.feature.CopyFrom(pb.FeatureEdit(feature=x.feature, mode=modes[x.mode],
                                                    value=x.value))
        else:
            message.vector.CopyFrom(pb.SteeringVector(values=x.vector))
        if x.when is not None:
            message.when.CopyFrom(condition_message(x.when))
        out.append(message)
    return out


def condition_message(c: Condition) -> pb.Condition:
    return pb.Condition(layer=c.layer, feature=c.feature, value=c.value, sticky=c.sticky,
                        include_out_of_distribution=c.include_out_of_distribution)


def monitor_spec(message: pb.MonitorRequest, limits: Limits, *, raw: bool = False,
                 require_layers: bool = False) -> MonitorSpec:
    """An engine :class:`MonitorSpec` (range checks against the dictionary come later)."""
    if require_layers and not message.layers:
        raise RequestError("monitor.layers is empty; name at least one dictionary layer")
    if len(set(message.layers)) != len(message.layers):
        raise RequestError(f"monitor.layers={list(message.layers)} repeats a layer")
    if not 0 <= message.top_k <= limits.max_top_k:
        raise RequestError(f"monitor.top_k={message.top_k}; allowed 0..{limits.max_top_k}")
    if len(message.watch) > limits.max_watch:
        raise RequestError(f"monitor.watch has {len(message.watch)} features; at most "
                           f"{limits.max_watch} (max_watch)")
    if len(message.thresholds) > limits.max_thresholds:
        raise RequestError(f"monitor.thresholds has {len(message.thresholds)} entries; at most "
                           f"{limits.max_thresholds}")
    if message.layers and not (message.top_k or message.watch or message.thresholds or raw):
        raise RequestError("monitor: layers are set but nothing to report; set monitor.top_k, "
                           "monitor.watch or monitor.thresholds")
    thresholds = tuple(
        Threshold(t.layer, t.feature, _finite(t.value, f"monitor.thresholds[{i}].value"))
        for i, t in enumerate(message.thresholds))
    return MonitorSpec(tuple(message.layers), message.top_k, tuple(message.watch), raw,
                       thresholds, message.include_out_of_distribution)


_ENUM_TYPE = re.compile(r"for enum type resae\.v1\.(\w+)")


def resae_options(data: Any, limits: Limits
                  ) -> tuple[list[SteerEdit | SteerVector], MonitorSpec | None]:
    """The ``resae`` field of an OpenAI-compatible request (the protobuf JSON mapping of
    :class:`pb.ResaeOptions`: ``GenerateRequest``'s interventions and monitor), checked as
    :func:`interventions` and :func:`monitor_spec` check gRPC requests, with the same
    messages."""
    if not isinstance(data, dict):
        raise RequestError(f"resae={json_type(data)}; must be an object with the fields "
                           "interventions and monitor")
    try:
        options = json_format.ParseDict(data, pb.ResaeOptions())
    except json_format.ParseError as exc:
        message = str(exc).replace("\n", " ")
        enum = _ENUM_TYPE.search(message)
        if enum is not None and enum.group(1) in pb.DESCRIPTOR.enum_types_by_name:
            names = pb.DESCRIPTOR.enum_types_by_name[enum.group(1)].values_by_name
            message += f" Allowed: {', '.join(names)}"
        raise RequestError(f"resae: {message}") from exc
    edits = interventions(options.interventions, limits)
    monitor = monitor_spec(options.monitor, limits) if options.HasField("monitor") else None
    return edits, monitor


def json_type(value: Any) -> str:
    """A short description of a JSON value for error messages (type, not the content)."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def features_json(features: Sequence[TokenFeatures], events: Sequence[MonitorEvent]
                  ) -> dict[str, Any]:
    """Features and events as the ``resae`` field of an OpenAI-compatible response: the
    protobuf JSON mapping of :class:`pb.ResaeFeatures` (empty lists and zeros kept)."""
    message = pb.ResaeFeatures(features=feature_messages(features),
                               events=event_messages(events))
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


# ----------------------------------------------------------------------------- outputs

def token_messages(ids: Sequence[int], start: int, tokenizer: Any) -> list[pb.Token]:
    """``Token`` messages for ids at positions ``start, start + 1, ...``."""
    return [pb.Token(position=start + i, id=t, text=tokenizer.decode([t]))
            for i, t in enumerate(ids)]


def feature_messages(features: Sequence[TokenFeatures]) -> list[pb.TokenFeatures]:
    """``TokenFeatures`` messages; the out-of-distribution code maps to the enum of the same
    number (:class:`~resae_serve.context.OutOfDistribution`)."""
    return [pb.TokenFeatures(position=f.position, layer=f.layer,
                             top=[pb.FeatureValue(feature=i, value=v)
                                  for i, v in zip(f.top_ids, f.top_values, strict=True)],
                             watch=list(f.watch),
                             out_of_distribution=bool(f.out_of_distribution),
                             out_of_distribution_reason=f.out_of_distribution)
            for f in features]


def event_message(e: MonitorEvent) -> pb.FeatureEvent:
    """A ``FeatureEvent`` (``monitor`` set for a server-wide monitor's)."""
    return pb.FeatureEvent(position=e.position, layer=e.layer, feature=e.feature,
                           value=e.value, threshold=e.threshold, monitor=e.monitor)


def event_messages(events: Sequence[MonitorEvent]) -> list[pb.FeatureEvent]:
    return [event_message(e) for e in events]


def chunk_message(chunk: GenerationChunk, start: int, tokenizer: Any) -> pb.TokenChunk:
    """A ``TokenChunk`` for an engine chunk whose first token sits at position ``start``."""
    return pb.TokenChunk(tokens=token_messages(chunk.token_ids, start, tokenizer),
                         text=chunk.text, features=feature_messages(chunk.features),
                         events=event_messages(chunk.events))
