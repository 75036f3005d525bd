"""The monitor through onnxruntime (the export's ``encode_layer`` graphs) against the monitor
through torch (the op's math, the oracle), fed the same captures of the real op.

Tolerances: float32, every top-k value and watched value within 1e-4 absolute, and the same
top-k features except at exact ties (the zero codes of ReLU / JumpReLU layers, and values that
are equal); float16 graphs, within the export's stated float16 tolerance,
``1e-2 + 1e-2 · max|value|`` (:data:`resae_serve.export.spec.DEFAULT_TOLERANCES`), with features
left out of the set comparison where their value lies within that tolerance of the k-th.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from resae_serve.artifact import save_artifact
from resae_serve.engine.encoders import RuntimeEncoder, TorchEncoder, build_encoder
from resae_serve.engine.monitor import Monitor, StepCapture
from resae_serve.engine.rpc import MonitorRecord
from resae_serve.engine.spec import MonitorSpec, SteerEdit, SteeringSpec, SteerVector, Threshold
from resae_serve.engine.tables import SteeringTables
from resae_serve.export.convert import export_artifact
from resae_serve.export.spec import DEFAULT_TOLERANCES, ExportConfig
from resae_serve.resae import ReSAE
from tests.unit.resae_fixtures import D_MODEL, D_SAE, IDENTITY, LAYERS, K, tiny_acts, tiny_resae

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install onnxruntime)")

ARCHITECTURES = ("topk", "jumprelu", "relu")
F32_ATOL = 1e-4


@pytest.fixture(scope="module", params=ARCHITECTURES)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[ReSAE, Path]:
    root = tmp_path_factory.mktemp(f"enc-{request.param}")
    resae = tiny_resae("resae", request.param)
    artifact = save_artifact(resae, root / "dict", IDENTITY)
    export_artifact(artifact, root / "export",
                    ExportConfig(precisions=("float32", "float16"), graphs=("encode_layer",),
                                 reference_tokens=0))
    return resae, root / "export"


def _op_step(resae: ReSAE, specs: dict[str, SteeringSpec | None], counts: list[int],
             starts: list[int], acts: dict[int, torch.Tensor]) -> StepCapture:
    """One forward pass through the op; what it hands the monitor."""
    n = sum(counts)
    tables = SteeringTables(resae, max_tokens=n, max_rows=9)
    rows = [tables.claim(key, spec) for key, spec in specs.items()]
    tables.prepare_step(n, rows, np.array(counts), np.array(starts), np.array(counts))
    for i, layer in enumerate(LAYERS):
        tables.apply(i, acts[layer].clone(), torch.zeros(n, D_MODEL))
    return StepCapture(keys=list(specs), counts=np.array(counts), starts=np.array(starts),
                       layers=tables.take_captures())


def _specs(resae: ReSAE, top_k: int) -> tuple[dict[str, SteeringSpec | None], MonitorSpec]:
    """A plain monitored request and a steered one (edits at both layers) in one pass."""
    watch = (0, 5, 17, D_SAE - 1)
    monitor = MonitorSpec(LAYERS, top_k=top_k, watch=watch,
                          thresholds=(Threshold(LAYERS[1], 5, 0.05),))
    vector = tuple(float(x) for x in torch.linspace(-1, 1, D_MODEL))
    steered = SteeringSpec(edits=(SteerEdit(LAYERS[0], 1, "add", 2.0),
                                  SteerEdit(LAYERS[1], 5, "clamp", 3.0),
                                  SteerEdit(LAYERS[1], 3, "scale", 2.0),
                                  SteerEdit(LAYERS[1], 7, "ablate")),
                           vectors=(SteerVector(LAYERS[1], vector),), monitor=monitor, key="s")
    return {"c": SteeringSpec(monitor=monitor, key="c"), "s": steered}, monitor


def _monitored(resae: ReSAE, encoder: object, top_k: int) -> dict[str, list[MonitorRecord]]:
    specs, monitor_spec = _specs(resae, top_k)
    monitor = Monitor(resae, encoder=encoder)  # type: ignore[arg-type]
    for key in specs:
        monitor.register(key, monitor_spec)
    # two passes: the prompts (5 and 4 tokens), then one decode step each
    for counts, starts, seed in (([5, 4], [0, 0], 1), ([1, 1], [5, 4], 2)):
        monitor.submit(_op_step(resae, specs, counts, starts,
                                tiny_acts(sum(counts), seed=seed)))
    return {key: monitor.take(key) for key in specs}


def _assert_same(ours: MonitorRecord, oracle: MonitorRecord, atol: float) -> None:
    """Values within ``atol``; the same features except where values tie within ``atol``."""
    assert (ours.key, ours.position, ours.layer) == (oracle.key, oracle.position, oracle.layer)
    np.testing.assert_allclose(ours.top_values, oracle.top_values, atol=atol, rtol=0)
    np.testing.assert_allclose(ours.watch, oracle.watch, atol=atol, rtol=0)
    kth = oracle.top_values[-1]
    clear = {f for f, v in zip(oracle.top_ids, oracle.top_values, strict=True) if v > kth + atol}
    mine = {f for f, v in zip(ours.top_ids, ours.top_values, strict=True) if v > kth + atol}
    assert clear <= set(ours.top_ids) and mine <= set(oracle.top_ids), (ours, oracle)
    assert [e.feature for e in ours.events] == [e.feature for e in oracle.events] or any(
        abs(v - 0.05) <= atol for v in ours.watch)                   # a threshold at a tie


@pytest.mark.parametrize("top_k", [2, K])
def test_onnxruntime_monitor_equals_torch_monitor_float32(exported: tuple[ReSAE, Path],
                                                          top_k: int) -> None:
    resae, export = exported
    encoder = build_encoder(resae, "onnxruntime", export)
    assert isinstance(encoder, RuntimeEncoder) and encoder.info.backend == "onnxruntime"
    assert encoder.info.provider == "cpu" and encoder.info.threads == 1
    ours, oracle = _monitored(resae, encoder, top_k), _monitored(resae, TorchEncoder(resae), top_k)
    for key, positions in (("c", 6), ("s", 5)):         # plain and steered tokens
        assert len(ours[key]) == len(oracle[key]) == 2 * positions      # 2 layers each
        for mine, want in zip(ours[key], oracle[key], strict=True):
            _assert_same(mine, want, F32_ATOL)
    steered_codes = {(r.position, r.layer): r.top_values for r in oracle["s"]}
    plain_codes = {(r.position, r.layer): r.top_values for r in oracle["c"]}
    assert steered_codes != plain_codes          # the steered request's codes really differ


def test_float16_export_is_within_its_stated_tolerance(exported: tuple[ReSAE, Path]) -> None:
    resae, export = exported
    tol = DEFAULT_TOLERANCES["float16"]
    encoder = build_encoder(resae, "onnxruntime", export, precision="float16")
    assert encoder.info.precision == "float16"
    ours, oracle = _monitored(resae, encoder, K), _monitored(resae, TorchEncoder(resae), K)
    for key in ("c", "s"):
        scale = max(max(abs(v) for v in r.top_values + r.watch) for r in oracle[key])
        for mine, want in zip(ours[key], oracle[key], strict=True):
            _assert_same(mine, want, tol.allowed(scale))


def test_more_features_than_slots_at_a_dense_layer_read_like_torch(
        exported: tuple[ReSAE, Path]) -> None:
    """ReLU / JumpReLU codes beyond the graph's k slots come from torch (exact)."""
    resae, export = exported
    encoder = build_encoder(resae, "onnxruntime", export)
    ours, oracle = _monitored(resae, encoder, 2 * K), _monitored(resae, TorchEncoder(resae), 2 * K)
    for mine, want in zip(ours["s"], oracle["s"], strict=True):
        _assert_same(mine, want, F32_ATOL)


def test_an_export_of_another_dictionary_is_refused(exported: tuple[ReSAE, Path]) -> None:
    _, export = exported
    other = tiny_resae("resae", "topk", seed=5)
    with pytest.raises(ValueError, match=r"field 'fingerprint' .* export it again"):
        build_encoder(other, "onnxruntime", export)


def test_torch_is_the_default_encoder() -> None:
    resae = tiny_resae()
    monitor = Monitor(resae)
    assert isinstance(monitor.encoder, TorchEncoder) and monitor.encoder.info.backend == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_gpu_runtimes_equal_torch_on_cuda(exported: tuple[ReSAE, Path], backend: str) -> None:
    """The GPU paths (ORT CUDA / TensorRT providers, TensorRT engines) on CUDA captures."""
    from resae_serve.export.errors import MissingDependencyError

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    resae, export = exported
    cuda = copy.deepcopy(resae).to("cuda")
    try:
        encoder = build_encoder(cuda, backend, export, device="cuda")
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    h = {L: a.cuda() for L, a in tiny_acts(16).items()}
    oracle = TorchEncoder(cuda)
    for i in range(len(LAYERS)):
        prev = h[LAYERS[i - 1]] if i else None
        mine = encoder.codes(i, h[LAYERS[i]], prev, [0, 5], K)
        want = oracle.codes(i, h[LAYERS[i]], prev, [0, 5], K)
        dense = [c if isinstance(c, torch.Tensor) else torch.zeros(16, D_SAE, device="cuda")
                 .scatter(1, c.indices, c.values) for c in (mine, want)]
        torch.testing.assert_close(dense[0].float(), dense[1].float(), atol=F32_ATOL, rtol=0)
