"""Hypothesis strategies for resae.v1 requests that are often subtly wrong.

Every strategy builds a structurally valid proto request (or raw bytes meant as one) whose
content is sometimes semantically wrong: layers and features out of range, NaN/inf/1e38
values, empty, odd-unicode and enormous prompts, conflicting or too many edits, empty oneofs,
unknown enum values, sampling extremes, forged page tokens, messages above the 4 MiB limit.

Their expected outcomes: :mod:`tests.integration.fuzz_oracle`.
"""

from __future__ import annotations

import base64
import json
import math
import random
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from hypothesis import strategies as st

from resae_serve.server.v1 import resae_pb2 as pb
from tests.integration.server_harness import D_MODEL, D_SAE, LAYERS

T = TypeVar("T")
RPCS = ("Generate", "Inspect", "GetDictionary", "ListFeatures", "GetFeature", "SearchFeatures")
REQUEST_TYPES: dict[str, type[Message]] = {rpc: getattr(pb, f"{rpc}Request") for rpc in RPCS}
RESPONSE_TYPES: dict[str, type[Message]] = {rpc: getattr(pb, f"{rpc}Response") for rpc in RPCS}
SERVICE = "/resae.v1.ResaeService/"
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
HUGE = 4 * 1024 * 1024 + 65_536
"""Characters / bytes of an oversized field: above the 4 MiB message limit with a margin."""



@dataclass(frozen=True)
class ServerShape:
    """The dictionary and limits the oracle judges against (defaults: the test server's
    ``base_config`` and dictionary)."""

    layers: tuple[int, ...] = LAYERS
    d_sae: int = D_SAE
    d_model: int = D_MODEL
    vocab_size: int = 49152
    max_tokens: int = 64
    default_max_tokens: int = 8
    max_prompt_tokens: int = 256
    max_edits: int = 8
    max_top_k: int = 32
    max_watch: int = 64
    max_thresholds: int = 64
    max_search_chars: int = 4000
    max_model_len: int = 512
    max_message_bytes: int = 4 * 1024 * 1024
    edits_per_layer: int = 8
    """Engine rule: feature edits per layer and request."""
    max_page_size: int = 1000
    max_hits: int = 100
    max_stop: int = 16
    max_stop_chars: int = 256
    max_temperature: float = 2.0


SHAPE = ServerShape()


# ----------------------------------------------------------------------------- building blocks

def weighted(*options: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """Draw from one of ``options`` with probability proportional to its weight (shrinks
    towards the first option)."""
    return _weighted(options)


@st.composite
def _weighted(draw: st.DrawFn, options: tuple[tuple[int, st.SearchStrategy[T]], ...]) -> T:
    pick = draw(st.integers(0, sum(weight for weight, _ in options) - 1))
    for weight, strategy in options:
        if pick < weight:
            return draw(strategy)
        pick -= weight
    raise AssertionError("unreachable")


INT32 = (-2**31, 2**31 - 1)
ODD_PIECES = (
    "Hello", " world", "The cat", ".", " ", "\t", "\n", "\r\n", "\u00a0", "\u2028", "\u3000",
    "\u200b", "\u200d", "\u200e", "\u200f", "\u202e", "\u2066", "\ufeff", "\ufffd", "\uffff",
    "\x00", "\x01", "\x1f", "\x7f", "e\u0301", "\u0301\u0302", "a\u0308\u0304\u0323",
    "Z\u0351\u036b\u0343\u036a\u0302", "\U0001f469\u200d\U0001f4bb",
    "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\U0001f1eb\U0001f1f7", "\U0001f44d\U0001f3fd", "\U0001f600", "\U0010fffd", "\U000e0041",
    "مرحبا", "שלום", "日本語", "한국어", "Ελληνικά", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
)
codepoints = st.integers(1, 0x10FFFF).map(lambda i: chr(i + 0x800 if 0xD800 <= i < 0xE000 else i))
"""Any Unicode scalar value (surrogates shifted out; NUL comes from :data:`ODD_PIECES`)."""
odd_text = st.lists(weighted((3, st.sampled_from(ODD_PIECES)), (1, codepoints)),
                    min_size=1, max_size=12).map("".join)
"""Short non-empty text mixing words, invisible marks, RTL, emoji, NUL, combining marks."""
blank_text = st.lists(st.sampled_from([" ", "\t", "\n", "\u2028", "\u3000", "\x1f", "\x0b"]),
                      min_size=1, max_size=4).map("".join)
many_words = st.integers(240, 272).map(lambda n: "word " * n)
"""Prompts around max_prompt_tokens (256): one token per word."""
enormous_words = st.integers(300, 20_000).map(lambda n: "word " * n)


def layers(*, valid: int = 19) -> st.SearchStrategy[int]:
    """A dictionary layer most of the time, else a wrong one (negative, between, beyond)."""
    bad = st.sampled_from([-1, 0, 5, 7, 29, 30, 100, *INT32]) | st.integers(*INT32)
    return weighted((valid, st.sampled_from(SHAPE.layers)), (1, bad))


def features(*, valid: int = 19) -> st.SearchStrategy[int]:
    """A latent id 0 .. d_sae-1 most of the time, else one out of range."""
    bad = st.sampled_from([-1, SHAPE.d_sae, *INT32]) | st.integers(SHAPE.d_sae, INT32[1])
    return weighted((valid, st.integers(0, SHAPE.d_sae - 1)), (1, bad))


def values() -> st.SearchStrategy[float]:
    """Edit and threshold values: ordinary, extreme but finite (1e38), or NaN/inf."""
    extreme = st.sampled_from([0.0, -0.0, 1e-45, 1e6, 1e38, -1e38, 3.4e38])
    return weighted((16, st.floats(-20, 20, width=32)), (2, extreme),
                    (1, st.sampled_from([math.nan, math.inf, -math.inf, 1e39])))


@st.composite
def vector_values(draw: st.DrawFn) -> list[float]:
    """d_model floats (a scaled gaussian from a drawn seed), sometimes the wrong length or
    with a non-finite entry."""
    n = draw(weighted((16, st.just(SHAPE.d_model)),
                      (1, st.sampled_from([0, 1, SHAPE.d_model - 1, SHAPE.d_model + 1]))))
    rng = random.Random(draw(st.integers(0, 2**32)))
    scale = draw(st.sampled_from([0.0, 0.01, 1.0, 100.0, 1e38]))
    out = [rng.gauss(0.0, 1.0) * scale for _ in range(n)]
    if n and draw(st.integers(0, 19)) == 0:
        out[draw(st.integers(0, n - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return out


# ----------------------------------------------------------------------------- inputs

def chat_messages() -> st.SearchStrategy[pb.ChatMessage]:
    """A chat turn: usually a known role, odd or empty or long content."""
    roles = weighted((19, st.sampled_from(["system", "user", "assistant"])),
                     (1, st.sampled_from(["", "robot", "User", "tool", "system ", "\x00"])))
    content = weighted((6, odd_text), (1, st.just("")), (1, many_words))
    return st.builds(lambda r, c: pb.ChatMessage(role=r, content=c), roles, content)


def inputs() -> st.SearchStrategy[pb.Input]:
    """A prompt, chat or token ids; sometimes empty, unset, too long or with a bad id."""
    prompt = weighted((12, odd_text), (1, st.just("")), (1, blank_text), (2, many_words),
                      (1, enormous_words))
    chat = st.lists(chat_messages(), min_size=0, max_size=3)
    ok_id = st.integers(0, SHAPE.vocab_size - 1)
    bad_id = st.sampled_from([-1, SHAPE.vocab_size, *INT32])
    ids = weighted((14, st.lists(ok_id, min_size=1, max_size=20)), (1, st.just([])),
                   (1, st.tuples(st.lists(ok_id, max_size=5), bad_id).map(lambda t: [*t[0], t[1]])),
                   (1, st.lists(ok_id, min_size=250, max_size=300)))
    return weighted(
        (12, prompt.map(lambda p: pb.Input(prompt=p))),
        (4, chat.map(lambda m: pb.Input(chat=pb.ChatMessages(messages=m)))),
        (4, ids.map(lambda i: pb.Input(token_ids=pb.TokenIds(ids=i)))),
        (1, st.just(pb.Input())))


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    """Sampling with extremes; valid ones stay cheap (max_tokens 1..4; 0 and 64 are rare)."""
    message = pb.SamplingParams(max_tokens=draw(weighted(
        (24, st.integers(1, 4)), (1, st.just(0)), (1, st.just(SHAPE.max_tokens)),
        (2, st.sampled_from([-1, SHAPE.max_tokens + 1, *INT32])))))
    temperature = weighted(
        (12, st.sampled_from([0.0, 0.7, 1.0]) | st.floats(0, 2, width=32)),
        (1, st.sampled_from([2.0, 1e-30, -0.0, 2.5, 50.0, SHAPE.max_temperature])),
        (2, st.sampled_from([101.0, -1.0, math.nan, math.inf, -math.inf, 1e30])))
    top_p = weighted((8, st.just(1.0) | st.floats(2**-20, 1.0, width=32)), (1, st.just(1e-45)),
                     (2, st.sampled_from([0.0, 1.5, -0.1, math.nan, math.inf])))
    top_k = weighted((8, st.sampled_from([0, 1, 5, 50, SHAPE.vocab_size, INT32[1]])),
                     (1, st.sampled_from([-1, -5, INT32[0]])))
    for name, strategy in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                           ("seed", st.integers(-2**63, 2**63 - 1))):
        if draw(st.booleans()):
            setattr(message, name, draw(strategy))
    message.stop.extend(draw(weighted(
        (12, st.just([])), (4, st.lists(odd_text, min_size=1, max_size=3)),
        (1, st.sampled_from([["x" * 256], ["é" * 256, "\x00"], ["a"] * 16])),
        (1, st.sampled_from([[""], ["x" * 257], ["a"] * 17, ["ok", ""]])))))
    return message


# ----------------------------------------------------------------------------- steering

def phases() -> st.SearchStrategy[int]:
    """``Phase`` values, sometimes unknown ones (4, 42, -1, 2**31-1)."""
    return weighted((19, st.sampled_from([0, 1, 2, 3])),
                    (1, st.sampled_from([4, 42, -1, INT32[1]])))


def modes() -> st.SearchStrategy[int]:
    """``EditMode`` values, sometimes UNSPECIFIED or unknown (5, 99, -1)."""
    return weighted((19, st.sampled_from([1, 2, 3, 4])), (1, st.sampled_from([0, 5, 99, -1])))


def feature_edit(layer: int, feature: int, mode: int, value: float,
                 phase: int = 0) -> pb.Intervention:
    """A feature-edit intervention (mode and phase as raw enum numbers)."""
    return pb.Intervention(layer=layer, phase=phase,
                           feature=pb.FeatureEdit(feature=feature, mode=mode, value=value))


def interventions() -> st.SearchStrategy[list[pb.Intervention]]:
    """None, a few mixed ones, conflicting edits of one feature, or 8-10 on one layer."""
    edit = st.builds(feature_edit, layers(), features(), modes(), values(), phases())
    vec = st.builds(lambda layer, v, p: pb.Intervention(
        layer=layer, phase=p, vector=pb.SteeringVector(values=v)), layers(), vector_values(),
        phases())
    empty = st.builds(lambda layer, p: pb.Intervention(layer=layer, phase=p), layers(), phases())
    one = weighted((12, edit), (3, vec), (1, empty))
    conflicting = st.builds(
        lambda layer, f, v: [feature_edit(layer, f, pb.EDIT_MODE_CLAMP, v),
                             feature_edit(layer, f, pb.EDIT_MODE_ABLATE, 0.0),
                             feature_edit(layer, f, pb.EDIT_MODE_CLAMP, v)],
        st.sampled_from(SHAPE.layers), st.integers(0, SHAPE.d_sae - 1), values())
    crowded = st.builds(lambda layer, n: [feature_edit(layer, i, pb.EDIT_MODE_ADD, 1.0)
                                          for i in range(n)],
                        st.sampled_from(SHAPE.layers), st.integers(8, 10))
    return weighted((5, st.just([])), (4, st.lists(one, min_size=1, max_size=3)),
                    (1, conflicting), (1, crowded))


@st.composite
def monitors(draw: st.DrawFn, *, require_layers: bool = False) -> pb.MonitorRequest:
    """A monitor: usually consistent (thresholds on monitored layers), sometimes not."""
    chosen = draw(weighted(
        (12, st.lists(st.sampled_from(SHAPE.layers), min_size=int(require_layers), max_size=4,
                     unique=True)),
        (1, st.sampled_from(SHAPE.layers).map(lambda x: [x, x])),
        (1, st.lists(layers(valid=1), min_size=1, max_size=2)),
        (1 if require_layers else 2, st.just([]))))
    top_k = draw(weighted((16, st.integers(0, SHAPE.max_top_k)),
                          (1, st.sampled_from([SHAPE.max_top_k + 1, -1, SHAPE.d_sae, INT32[1]]))))
    watch = draw(weighted((14, st.lists(st.integers(0, SHAPE.d_sae - 1), max_size=5)),
                          (1, st.lists(features(valid=1), min_size=1, max_size=3)),
                          (1, st.integers(SHAPE.max_watch, SHAPE.max_watch + 1).map(
                              lambda n: [i % SHAPE.d_sae for i in range(n)]))))
    on = st.sampled_from(chosen) if chosen else layers()
    threshold = st.builds(lambda layer, f, v: pb.Threshold(layer=layer, feature=f, value=v),
                          weighted((16, on), (1, layers())), features(), values())
    thresholds = draw(weighted(
        (14, st.lists(threshold, max_size=3)),
        (1, st.integers(SHAPE.max_thresholds, SHAPE.max_thresholds + 1).map(
            lambda n: [pb.Threshold(layer=(chosen or [6])[0], feature=i % SHAPE.d_sae,
                                    value=1.0) for i in range(n)]))))
    return pb.MonitorRequest(layers=chosen, top_k=top_k, watch=watch, thresholds=thresholds)


# ----------------------------------------------------------------------------- requests

def oversized(rpc: str) -> st.SearchStrategy[Message]:
    """A request of ``rpc`` above the message size limit (gRPC answers RESOURCE_EXHAUSTED)."""
    text = "a" * HUGE
    if rpc in ("Generate", "Inspect"):
        big = weighted((2, st.just(pb.Input(prompt=text))), (1, st.just(pb.Input(
            token_ids=pb.TokenIds(ids=[SHAPE.vocab_size - 1] * (HUGE // 3 + 1))))))
        return big.map(lambda i: REQUEST_TYPES[rpc](input=i))
    if rpc == "SearchFeatures":
        return st.just(pb.SearchFeaturesRequest(text=text))
    if rpc == "ListFeatures":
        return st.just(pb.ListFeaturesRequest(layer=6, page_token=text))
    raise ValueError(f"rpc={rpc!r} has no field that can hold {HUGE} bytes")


def generate_requests() -> st.SearchStrategy[pb.GenerateRequest]:
    """Generate requests: input, sampling (sometimes unset), interventions, monitor."""
    normal = st.builds(
        lambda i, s, x, m: pb.GenerateRequest(input=i, sampling=s, interventions=x, monitor=m),
        inputs(), weighted((9, sampling()), (1, st.none())), interventions(),
        weighted((3, st.none()), (4, monitors()), (1, st.just(pb.MonitorRequest()))))
    return weighted((40, normal), (1, oversized("Generate")))


def inspect_requests() -> st.SearchStrategy[pb.InspectRequest]:
    """Inspect requests: input, a monitor that needs layers (sometimes unset), steering."""
    normal = st.builds(
        lambda i, m, x: pb.InspectRequest(input=i, monitor=m, interventions=x),
        inputs(), weighted((8, monitors(require_layers=True)), (1, st.none())), interventions())
    return weighted((40, normal), (1, oversized("Inspect")))


def page_token(layer: int, labeled: bool, offset: Any) -> str:
    """A page token as the server issues them (base64 of compact JSON)."""
    blob = json.dumps({"layer": layer, "labeled": labeled, "offset": offset},
                      separators=(",", ":"))
    return base64.urlsafe_b64encode(blob.encode()).decode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@st.composite
def list_features_requests(draw: st.DrawFn) -> pb.ListFeaturesRequest:
    """Pages with real, forged and garbage tokens (and known-bug tokens: inf, deep nesting)."""
    if draw(st.integers(0, 40)) == 0:
        return draw(oversized("ListFeatures"))
    layer, labeled = draw(layers()), draw(st.booleans())
    b64, flag = _b64, b"true" if labeled else b"false"
    forged = st.sampled_from([
        page_token(12 if layer == 6 else 6, labeled, 0), page_token(layer, not labeled, 100),
        page_token(layer, labeled, -1), page_token(layer, labeled, None),
        page_token(layer, labeled, "x"), page_token(layer, labeled, [1]),
        b64(json.dumps({"layer": layer, "labeled": labeled}).encode()), b64(b"[1, 2]"),
        b64(b"5"), b64(b'"text"'), b64(b"\xff\xfe\x00"), b64(b"{"), "garbage", "!!!!", "é",
        b64(b'{"layer":%d,"labeled":%s,"offset":1e999}' % (layer, flag)),
        b64(b'{"layer":%d,"labeled":false,"offset":-Infinity}' % layer), b64(b"[" * 100_000),
        b64(b'{"layer":%d,"labeled":false,"offset":%s}' % (layer, b"9" * 5000))])
    token = draw(weighted((5, st.just("")), (3, st.integers(0, 300).map(
        lambda o: page_token(layer, labeled, o))), (2, forged), (1, odd_text)))
    size = draw(weighted((6, st.sampled_from([0, 1, 10, 100, 256, 1000]) | st.integers(1, 1000)),
                         (1, st.sampled_from([-1, SHAPE.max_page_size + 1, *INT32]))))
    return pb.ListFeaturesRequest(layer=layer, page_size=size, page_token=token,
                                  labeled_only=labeled)


def search_features_requests() -> st.SearchStrategy[pb.SearchFeaturesRequest]:
    """Searches: odd, blank, empty, too long (characters or tokens) text; top; layers."""
    text = weighted((12, odd_text), (1, blank_text), (1, st.just("")), (2, many_words),
                    (1, st.integers(3990, 4100).map(lambda n: "x" * n)))
    top = weighted((7, st.integers(0, SHAPE.max_hits)),
                   (1, st.sampled_from([SHAPE.max_hits + 1, -1, *INT32])))
    chosen = weighted((6, st.lists(st.sampled_from(SHAPE.layers), max_size=3)),
                      (1, st.lists(layers(valid=1), min_size=1, max_size=2)))
    normal = st.builds(lambda t, k, x: pb.SearchFeaturesRequest(text=t, top=k, layers=x),
                       text, top, chosen)
    return weighted((40, normal), (1, oversized("SearchFeatures")))


REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "Generate": generate_requests(),
    "Inspect": inspect_requests(),
    "GetDictionary": st.just(pb.GetDictionaryRequest()),
    "ListFeatures": list_features_requests(),
    "GetFeature": st.builds(lambda x, f: pb.GetFeatureRequest(layer=x, feature=f),
                            layers(), features()),
    "SearchFeatures": search_features_requests(),
}
"""One request strategy per RPC."""


@st.composite
def raw_bytes(draw: st.DrawFn, rpc: str) -> bytes:
    """Bytes sent as ``rpc``'s request: random, a mangled valid encoding, or oversized."""
    kind = draw(weighted((4, st.just("random")), (5, st.just("mangled")), (1, st.just("huge"))))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "huge":
        return draw(st.sampled_from([b"\x00", b"\x0a", b"\xff"])) * HUGE
    data = bytearray(draw(REQUESTS[rpc]).SerializeToString()[:4096])
    for _ in range(draw(st.integers(1, 3))):
        op, at = draw(st.sampled_from(["flip", "cut", "insert"])), draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


RPC_WEIGHTS = {"Generate": 4, "Inspect": 3, "GetDictionary": 1, "ListFeatures": 2,
               "GetFeature": 1, "SearchFeatures": 2}
"""How often :func:`cases` draws each RPC (the richer the rules, the more often)."""


def cases(raw_share: int = 1, typed_share: int = 4) -> st.SearchStrategy[tuple[str, Any]]:
    """``(rpc, request or bytes)`` over every RPC (the long fuzz run's draws)."""
    return weighted(*((RPC_WEIGHTS[rpc], st.tuples(st.just(rpc), weighted(
        (typed_share, REQUESTS[rpc]), (raw_share, raw_bytes(rpc))))) for rpc in RPCS))
