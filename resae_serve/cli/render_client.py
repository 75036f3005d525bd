"""Plain-text rendering of resae.v1 responses for ``resae client`` (pure: no server, no I/O).

Every function returns a string without a trailing newline; the caller writes it.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from resae_serve.server.client import Completion
from resae_serve.server.v1 import resae_pb2 as pb

Labels = Mapping[tuple[int, int], str]
"""Feature labels by (layer, feature)."""

TOKEN_WIDTH = 16
"""Characters of a token's quoted text shown in a table."""


def show_token(text: str, width: int = TOKEN_WIDTH) -> str:
    """A token's text quoted with escapes (newlines stay visible), cut to ``width``."""
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def _feature(layer: int, value: pb.FeatureValue, labels: Labels) -> str:
    label = labels.get((layer, value.feature))
    return f"#{value.feature} {value.value:.2f}" + (f" ({label})" if label else "")


def token_table(tokens: Sequence[pb.Token], features: Iterable[pb.TokenFeatures], *,
                events: Iterable[pb.FeatureEvent] = (), watch: Sequence[int] = (),
                labels: Labels | None = None, prompt_length: int | None = None) -> str:
    """One row per token and monitored layer: the top features (and ``watch`` codes, in
    MonitorRequest.watch order). A rule marks the first generated token when
    ``prompt_length`` is given; threshold events follow the table. Rows of positions outside
    the dictionary's training distribution end with ``[out of distribution: reason]``."""
    labels = labels or {}
    by_position: dict[int, list[pb.TokenFeatures]] = defaultdict(list)
    for entry in features:
        by_position[entry.position].append(entry)
    lines = [f"{'pos':>5}  {'token':<{TOKEN_WIDTH}}  {'layer':>5}  top features"]
    for token in tokens:
        if prompt_length is not None and token.position == prompt_length:
            lines.append(f"{'':>5}  ── generated ──")
        head = f"{token.position:>5}  {show_token(token.text):<{TOKEN_WIDTH}}"
        rows = sorted(by_position.get(token.position, []), key=lambda e: e.layer)
        if not rows:
            lines.append(head.rstrip())
        for i, entry in enumerate(rows):
            cell = " · ".join(_feature(entry.layer, v, labels) for v in entry.top) or "-"
            if watch:
                codes = " ".join(f"#{f}={v:.2f}" for f, v in zip(watch, entry.watch, strict=False))
                cell += f"  | watch {codes}"
            if entry.out_of_distribution:
                cell += f"  [out of distribution: {_ood_reason(entry)}]"
            lines.append(f"{head if i == 0 else '':<{len(head)}}  {entry.layer:>5}  {cell}")
    text_of = {token.position: token.text for token in tokens}
    event_lines = [f"  pos {e.position} {show_token(text_of.get(e.position, '?'))} layer "
                   f"{e.layer} feature {e.feature}: {e.value:.2f} >= {e.threshold:.2f}"
                   + (f" (monitor {e.monitor})" if e.monitor else "")
                   for e in events]
    if event_lines:
        lines += ["threshold events:", *event_lines]
    return "\n".join(lines)


def _ood_reason(entry: pb.TokenFeatures) -> str:
    """``first position`` / ``norm outlier``: the reason's enum name in words."""
    try:
        name = pb.OutOfDistribution.Name(entry.out_of_distribution_reason)
    except ValueError:                          # a reason newer than this client
        return f"reason {entry.out_of_distribution_reason}"
    return name.removeprefix("OUT_OF_DISTRIBUTION_").replace("_", " ").lower()


def completion_table(completion: Completion, *, watch: Sequence[int] = (),
                     labels: Labels | None = None) -> str:
    """:func:`token_table` of a completion's prompt and generated tokens."""
    return token_table([*completion.prompt_tokens, *completion.tokens], completion.features,
                       events=completion.events, watch=watch, labels=labels,
                       prompt_length=len(completion.prompt_tokens))


def summary_line(summary: pb.GenerateSummary) -> str:
    """Finish reason, token counts and timing of a generation (and, when a server-wide
    monitor stopped it, which)."""
    line = (f"finish {summary.finish_reason or '?'}; {summary.prompt_tokens} prompt + "
            f"{summary.completion_tokens} generated tokens; first token after "
            f"{summary.time_to_first_token_s:.3f} s, {summary.total_time_s:.3f} s in all, "
            f"{summary.decode_tokens_per_s:.1f} tokens/s")
    if summary.HasField("guardrail"):
        g = summary.guardrail
        line += (f"; stopped by monitor {g.monitor!r} at position {g.position} (layer "
                 f"{g.layer} feature {g.feature}: {g.value:.2f} >= {g.threshold:.2f})")
    return line


def watch_line(message: pb.WatchedEvent | pb.EventsDropped) -> str:
    """One line of ``resae client watch``: an event (time in UTC, request, monitor and
    action, position and token, layer, feature, value >= threshold) or a drop notice."""
    if isinstance(message, pb.EventsDropped):
        return (f"... {message.dropped} event(s) dropped: this reader fell behind "
                f"({message.total} dropped in all)")
    when = datetime.fromtimestamp(message.time_unix_s, UTC)
    return (f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z  {message.request_id}  "
            f"{message.monitor} ({message.action})  pos {message.position} "
            f"{show_token(message.token_text)}  layer {message.layer} feature "
            f"{message.feature}: {message.value:.2f} >= {message.threshold:.2f}")


def wrap(text: str, width: int) -> list[str]:
    """``text`` wrapped to ``width`` columns, keeping its line breaks (blank lines too)."""
    lines: list[str] = []
    for paragraph in text.expandtabs(4).splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width, drop_whitespace=True) or [""]
    return lines


def side_by_side(left: str, right: str, width: int,
                 titles: tuple[str, str] = ("without steering", "with steering")) -> str:
    """Two texts in columns of equal width, each wrapped so no line exceeds ``width``."""
    gutter = " │ "
    column = max((width - len(gutter)) // 2, 8)
    head_left, head_right = _pad(wrap(titles[0], column), wrap(titles[1], column))
    rule = ["─" * column]
    left_lines, right_lines = _pad([*head_left, *rule, *wrap(left, column)],
                                   [*head_right, *rule, *wrap(right, column)])
    return "\n".join(f"{a:<{column}}{gutter}{b}".rstrip()
                     for a, b in zip(left_lines, right_lines, strict=True))


def _pad(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
    """Both lists of lines padded with blank lines to the same length."""
    rows = max(len(a), len(b))
    return a + [""] * (rows - len(a)), b + [""] * (rows - len(b))


def dictionary_text(response: pb.GetDictionaryResponse) -> str:
    """The served model, its dictionary layers and the request limits."""
    limits = response.limits
    lines = [f"model {response.model} (fingerprint {response.model_fingerprint or '-'}), "
             f"d_model {response.d_model}, mode {response.mode}, backend {response.backend}, "
             f"schema {response.schema_version}",
             f"{'layer':>5} {'d_sae':>7} {'architecture':<12} {'k':>4} {'scale':>9}  catalog"]
    for layer in response.layers:
        lines.append(f"{layer.layer:>5} {layer.d_sae:>7} {layer.architecture:<12} {layer.k:>4} "
                     f"{layer.scale:9.4g}  {'yes' if layer.has_catalog else 'no'}")
    lines.append(f"limits: max_tokens {limits.max_tokens}, max_prompt_tokens "
                 f"{limits.max_prompt_tokens}, max_edits {limits.max_edits}, max_watch "
                 f"{limits.max_watch}, max_top_k {limits.max_top_k}")
    return "\n".join(lines)


def _promoted(tokens: Iterable[str], n: int = 5) -> str:
    return " ".join(repr(t) for t in list(tokens)[:n])


def feature_list(features: Iterable[pb.Feature]) -> str:
    """One line per catalog entry: ids, density, activations, label, promoted tokens."""
    lines = [f"{'layer':>5} {'feature':>7} {'density':>9} {'mean':>7} {'max':>7}  "
             "label / promotes"]
    for f in features:
        about = f"{f.label}; " if f.label else ""
        lines.append(f"{f.layer:>5} {f.feature:>7} {f.density:9.2e} {f.mean_activation:7.2f} "
                     f"{f.max_activation:7.2f}  {about}promotes {_promoted(f.promoted)}")
    return "\n".join(lines)


def feature_detail(feature: pb.Feature) -> str:
    """A feature's full catalog entry: statistics, promoted and suppressed tokens, contexts."""
    lines = [f"layer {feature.layer} feature {feature.feature}"
             + (f": {feature.label}" if feature.label else " (no label)"),
             f"density {feature.density:.3e}, mean activation {feature.mean_activation:.3f}, "
             f"max activation {feature.max_activation:.3f}",
             f"promotes:   {_promoted(feature.promoted, 10) or '-'}",
             f"suppresses: {_promoted(feature.suppressed, 10) or '-'}"]
    if feature.contexts:
        lines.append("top contexts:")
        lines += [f"  {c.activation:7.2f}  {c.text!r}" for c in feature.contexts]
    return "\n".join(lines)


def search_hits(hits: Sequence[pb.SearchHit], text: str) -> str:
    """Search results, best first: lift, mean code on the text, where it fires, label."""
    lines = [f"features most active on {text!r} relative to their held-out average:",
             f"{'layer':>5} {'feature':>7} {'lift':>8} {'on text':>8}  fires on / label / "
             "promotes"]
    for hit in hits:
        f = hit.feature
        fires = " ".join(f"{t.token!r}:{t.value:.2f}" for t in hit.fires_on)
        lines.append(f"{f.layer:>5} {f.feature:>7} {hit.score:8.1f} {hit.mean_on_text:8.3f}  "
                     f"{fires}")
        about = f"label: {f.label}; " if f.label else ""
        lines.append(f"{'':>33}{about}promotes {_promoted(f.promoted)}")
    if not hits:
        lines.append("(no feature fired on this text)")
    return "\n".join(lines)
