"""``resae client``: generate with steering, inspect features, browse the catalog and tail the
server-wide monitors' events of a running ``resae serve``.

gRPC failures end the command with ``error: <STATUS_CODE>: <details>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import grpc

from resae_serve.cli.render_client import (
    Labels,
    completion_table,
    dictionary_text,
    feature_detail,
    feature_list,
    search_hits,
    side_by_side,
    summary_line,
    token_table,
    watch_line,
)
from resae_serve.errors import ResaeError
from resae_serve.server.client import (
    DEFAULT_TARGET,
    EDIT_MODES,
    PHASES,
    Completion,
    ResaeClient,
    condition,
    edit,
    monitor,
)
from resae_serve.server.v1 import resae_pb2 as pb

logger = logging.getLogger(__name__)

STEER_FORMAT = (f"LAYER:FEATURE:MODE:VALUE[:PHASE][@WHEN] with MODE one of "
                f"{', '.join(EDIT_MODES)} and PHASE one of {', '.join(PHASES)} (e.g. "
                "12:345:add:4; VALUE may be left out for ablate); WHEN = "
                "LAYER:FEATURE>=VALUE[:sticky][:ood] applies the edit only on tokens where that "
                "feature's code (at a layer at or before the edit's) is >= VALUE; sticky: from "
                "the first such token on; ood: out-of-distribution positions may satisfy it "
                "(e.g. 18:7:clamp:0@12:345>=4:sticky)")
WHEN_FLAGS = ("sticky", "ood")
MAX_LABELS = 5000
"""Labeled features fetched per layer to annotate tables (ListFeatures, 1000 a page)."""

Action = Callable[[ResaeClient, argparse.Namespace], int]


def parse_ints(text: str) -> list[int]:
    """``"6,12"`` → ``[6, 12]`` (an argparse ``type``)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}; expected comma-separated integers") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}; expected comma-separated integers")
    return values


def parse_steer(spec: str) -> pb.Intervention:
    """One ``--steer`` spec, LAYER:FEATURE:MODE:VALUE[:PHASE][@WHEN], as an Intervention."""
    edit_part, at, when_part = spec.partition("@")
    parts = edit_part.split(":")
    if len(parts) == 3 and parts[2] == "ablate":
        parts.append("0")
    if len(parts) not in (4, 5):
        raise ResaeError(f"--steer {spec!r}: expected {STEER_FORMAT}")
    try:
        layer, feature, value = int(parts[0]), int(parts[1]), float(parts[3])
    except ValueError:
        raise ResaeError(f"--steer {spec!r}: LAYER and FEATURE must be integers and VALUE a "
                         f"number; expected {STEER_FORMAT}") from None
    gate = _parse_when(spec, when_part) if at else None
    try:
        return edit(layer, feature, parts[2], value, parts[4] if len(parts) == 5 else "all",
                    when=gate)
    except ValueError as exc:
        raise ResaeError(f"--steer {spec!r}: {exc}") from None


def _parse_when(spec: str, text: str) -> pb.Condition:
    """The ``@LAYER:FEATURE>=VALUE[:sticky][:ood]`` part of a ``--steer`` spec."""
    expected = "expected @LAYER:FEATURE>=VALUE[:sticky][:ood] (e.g. @12:345>=4)"
    head, ge, tail = text.partition(">=")
    value_text, *flags = tail.split(":")
    where = head.split(":")
    if not ge or len(where) != 2:
        raise ResaeError(f"--steer {spec!r}: condition {text!r}; {expected}")
    unknown = [f for f in flags if f not in WHEN_FLAGS]
    if unknown:
        raise ResaeError(f"--steer {spec!r}: condition flag {unknown[0]!r}; allowed: "
                         f"{', '.join(WHEN_FLAGS)}")
    try:
        layer, feature, value = int(where[0]), int(where[1]), float(value_text)
    except ValueError:
        raise ResaeError(f"--steer {spec!r}: condition {text!r}: LAYER and FEATURE must be "
                         f"integers and VALUE a number; {expected}") from None
    try:
        return condition(layer, feature, value, sticky="sticky" in flags,
                         include_out_of_distribution="ood" in flags)
    except ValueError as exc:
        raise ResaeError(f"--steer {spec!r}: {exc}") from None


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (an argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}; expected a number of seconds > 0")
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--target", metavar="HOST:PORT",
                       help=f"server address (default: $RESAE_TARGET or {DEFAULT_TARGET})")
    group.add_argument("--token", help="bearer token (default: $RESAE_TOKEN)")
    group.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="CA certificate to verify the server (enables TLS)")
    group.add_argument("--tls-cert", type=Path, metavar="PEM",
                       help="client certificate for mutual TLS (with --tls-key)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="client private key")
    group.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                       help="deadline of each call (default: none)")
    return common


def _input_args(p: argparse.ArgumentParser, top_k: int) -> None:
    p.add_argument("--chat", action="store_true", help="send the text as one user chat turn")
    p.add_argument("--steer", action="append", default=[], metavar="SPEC",
                   help=f"feature edit (repeatable): {STEER_FORMAT}")
    p.add_argument("--top-k", type=int, default=top_k,
                   help="top features per token and layer (default: %(default)s)")
    p.add_argument("--watch", type=parse_ints, action="extend", default=[], metavar="F,F",
                   help="feature ids whose codes are shown on every token")
    p.add_argument("--no-labels", action="store_true",
                   help="do not look up feature labels for the tables")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``resae client``."""
    p = subparsers.add_parser(
        "client", help="steer and monitor a running `resae serve` over gRPC",
        description="Talk to a running `resae serve`: generate (optionally steered, monitored, "
        "or compared with the unsteered output), inspect a text's features per token, and "
        "browse the feature catalog. gRPC errors exit with status 2.")
    actions = p.add_subparsers(dest="client_command", metavar="ACTION", required=True)
    common = _common()

    g = actions.add_parser("generate", parents=[common], help="generate a completion",
                           description="Generate a completion. --monitor-layers adds a table "
                           "of each token's top features; --compare prints the unsteered and "
                           "the steered completion side by side (greedy unless --temperature).")
    g.add_argument("prompt", help="prompt text")
    g.add_argument("--max-tokens", type=int, default=0, help="default: the server's")
    g.add_argument("--temperature", type=float, help="default: 1 (0 with --compare)")
    g.add_argument("--seed", type=int, help="sampling seed (reproducible outputs)")
    g.add_argument("--monitor-layers", type=parse_ints, metavar="L,L",
                   help="dictionary layers whose features are shown per token")
    g.add_argument("--compare", action="store_true",
                   help="also generate without --steer and show both side by side")
    _input_args(g, top_k=3)
    g.set_defaults(action=_generate)

    i = actions.add_parser("inspect", parents=[common], help="per-token features of a text")
    i.add_argument("text", help="text to read")
    i.add_argument("--layers", type=parse_ints, required=True, metavar="L,L",
                   help="dictionary layers to show")
    _input_args(i, top_k=5)
    i.set_defaults(action=_inspect)

    w = actions.add_parser(
        "watch", parents=[common], help="tail the server-wide monitors' events",
        description="Print the events of the server's own monitors (its config's "
        "[[watch.monitors]]) across all requests as they happen, one line each: time (UTC), "
        "request id, monitor and action, position and token, layer, feature, value and "
        "threshold. When this reader falls behind the server drops the oldest buffered "
        "events and says how many. Runs until interrupted, --count events, or --timeout.")
    w.add_argument("--monitor", action="append", default=[], metavar="NAME",
                   help="only this monitor (repeatable; default: all)")
    w.add_argument("--count", type=int, metavar="N", help="stop after N events")
    w.set_defaults(action=_watch)

    f = actions.add_parser("features", help="the served dictionary and its feature catalog")
    catalog = f.add_subparsers(dest="features_command", metavar="WHAT", required=True)
    d = catalog.add_parser("dictionary", parents=[common], help="model, layers and limits")
    d.set_defaults(action=_dictionary)
    ls = catalog.add_parser("list", parents=[common], help="a layer's features, a page at once")
    ls.add_argument("layer", type=int)
    ls.add_argument("--page-size", type=int, default=50, help="default: %(default)s")
    ls.add_argument("--page-token", default="", help="next_page_token of the previous page")
    ls.add_argument("--labeled-only", action="store_true", help="only labeled features")
    ls.add_argument("--all", action="store_true", help="every page")
    ls.set_defaults(action=_list)
    show = catalog.add_parser("show", parents=[common], help="one feature's catalog entry")
    show.add_argument("layer", type=int)
    show.add_argument("feature", type=int)
    show.set_defaults(action=_show)
    s = catalog.add_parser("search", parents=[common], help="find features by text")
    s.add_argument("text")
    s.add_argument("--top", type=int, default=10, help="hits (default: %(default)s)")
    s.add_argument("--layers", type=parse_ints, default=[], metavar="L,L",
                   help="only these layers (default: all)")
    s.set_defaults(action=_search)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Connect and run the action; gRPC errors become ``error: CODE: details``, status 2."""
    target = args.target or os.environ.get("RESAE_TARGET") or DEFAULT_TARGET
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ResaeError("--tls-cert and --tls-key go together (mutual TLS): give both, or "
                         "neither for server-only TLS with --tls-ca")
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise ResaeError(f"--{flag.replace('_', '-')} {path}: no such file")
    client = ResaeClient(target, token=args.token or os.environ.get("RESAE_TOKEN"),
                         tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                         timeout=args.timeout)  # TLSConfigError (a ResaeError) on bad PEMs
    action: Action = args.action
    try:
        with client:
            return action(client, args)
    except grpc.RpcError as exc:
        logger.debug("call to %s failed", target, exc_info=True)
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        sys.stderr.write(f"error: {code.name if code else 'UNKNOWN'}: {details}\n")
        return 2


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")


def _labels(client: ResaeClient, layers: list[int], args: argparse.Namespace) -> Labels:
    """Labels of the labeled features of ``layers`` (a few ListFeatures calls per layer)."""
    if args.no_labels:
        return {}
    labels: dict[tuple[int, int], str] = {}
    for layer in layers:
        try:
            for f in islice(client.iter_features(layer, 1000, labeled_only=True), MAX_LABELS):
                labels[(layer, f.feature)] = f.label
        except grpc.RpcError as exc:  # no catalog for this layer: tables go without labels
            logger.info("no feature labels for layer %d: %s", layer, exc.details())
    return labels


def _steering(args: argparse.Namespace) -> list[pb.Intervention]:
    return [parse_steer(spec) for spec in args.steer]


def _generate(client: ResaeClient, args: argparse.Namespace) -> int:
    steering = _steering(args)
    if args.watch and not args.monitor_layers:
        raise ResaeError("--watch needs --monitor-layers L,L")
    if args.compare and not steering:
        raise ResaeError("--compare needs at least one --steer SPEC to compare against")
    request = monitor(args.monitor_layers, args.top_k, args.watch) if args.monitor_layers \
        else None
    temperature = 0.0 if args.compare and args.temperature is None else args.temperature
    chat = [("user", args.prompt)] if args.chat else None
    prompt = None if args.chat else args.prompt

    def generate(interventions: list[pb.Intervention]) -> Completion:
        completion = Completion()
        stream = client.generate(prompt, chat=chat, max_tokens=args.max_tokens,
                                 temperature=temperature, seed=args.seed,
                                 interventions=interventions, monitor=request)
        for response in stream:
            text = completion.update(response)
            if request is None and not args.compare:  # plain generate: stream the text
                sys.stdout.write(text)
                sys.stdout.flush()
        if request is None and not args.compare:
            _write("")
        if completion.summary is not None:
            logger.info("request %s: %s", completion.request_id,
                        summary_line(completion.summary))
        return completion

    if not args.compare:
        completion = generate(steering)
        if request is not None:
            labels = _labels(client, args.monitor_layers, args)
            _write(completion.text + "\n")
            _write(completion_table(completion, watch=args.watch, labels=labels))
        return 0
    plain, steered = generate([]), generate(steering)
    width = shutil.get_terminal_size().columns
    _write(side_by_side(plain.text, steered.text, width,
                        titles=("without steering", "with --steer " + " ".join(args.steer))))
    if request is not None:
        labels = _labels(client, args.monitor_layers, args)
        for title, completion in (("without steering", plain), ("with steering", steered)):
            _write(f"\n{title}:")
            _write(completion_table(completion, watch=args.watch, labels=labels))
    return 0


def _inspect(client: ResaeClient, args: argparse.Namespace) -> int:
    chat = [("user", args.text)] if args.chat else None
    response = client.inspect(None if args.chat else args.text, chat=chat,
                              monitor=monitor(args.layers, args.top_k, args.watch),
                              interventions=_steering(args))
    _write(token_table(response.tokens, response.features, events=response.events,
                       watch=args.watch, labels=_labels(client, args.layers, args)))
    return 0


def _watch(client: ResaeClient, args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise ResaeError(f"--count {args.count}; expected a number of events >= 1")
    seen = 0
    try:
        for message in client.watch_events(args.monitor, timeout=args.timeout):
            _write(watch_line(message))
            sys.stdout.flush()
            if isinstance(message, pb.WatchedEvent):
                seen += 1
                if seen == args.count:
                    return 0
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        if code != grpc.StatusCode.DEADLINE_EXCEEDED:      # --timeout: watched long enough
            raise
        return 0
    logger.info("the server ended the stream (it is stopping)")
    return 0


def _dictionary(client: ResaeClient, args: argparse.Namespace) -> int:
    _write(dictionary_text(client.get_dictionary()))
    return 0


def _list(client: ResaeClient, args: argparse.Namespace) -> int:
    if args.all:
        _write(feature_list(client.iter_features(args.layer, args.page_size,
                                                 args.labeled_only)))
        return 0
    page = client.list_features(args.layer, args.page_size, args.page_token, args.labeled_only)
    _write(feature_list(page.features))
    more = f"; next page: --page-token {page.next_page_token}" if page.next_page_token else ""
    _write(f"({len(page.features)} of {page.total_size} features{more})")
    return 0


def _show(client: ResaeClient, args: argparse.Namespace) -> int:
    _write(feature_detail(client.get_feature(args.layer, args.feature).feature))
    return 0


def _search(client: ResaeClient, args: argparse.Namespace) -> int:
    response = client.search_features(args.text, args.top, args.layers)
    _write(search_hits(response.hits, args.text))
    return 0
