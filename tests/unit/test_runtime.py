"""Feature runtime: torch and onnxruntime backends agree with each other and the ReSAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resae_serve.artifact import load_artifact, save_artifact
from resae_serve.export.backend_onnxruntime import OnnxRuntime
from resae_serve.export.backend_torch import TorchRuntime
from resae_serve.export.convert import export_artifact
from resae_serve.export.errors import ExportError, MissingDependencyError
from resae_serve.export.folder import read_export_manifest
from resae_serve.export.runtime import FeatureRuntime, RuntimeConfig, open_runtime
from resae_serve.export.spec import ExportConfig
from resae_serve.interventions import EditTable, InterventionError
from resae_serve.resae import ReSAE
from resae_serve.saes import SparseCodes
from tests.unit.resae_fixtures import D_MODEL, D_SAE, IDENTITY, LAYERS, tiny_acts, tiny_resae

COMBOS = [("resae", "topk"), ("layerwise", "batchtopk")]


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c) for c in COMBOS])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[ReSAE, Path]:
    mode, arch = request.param
    root = tmp_path_factory.mktemp(f"{mode}-{arch}")
    artifact = save_artifact(tiny_resae(mode, arch), root / "dict", IDENTITY)
    export_artifact(artifact, root / "export", ExportConfig(precisions=("float32", "float16")))
    return load_artifact(artifact)[0], root / "export"


def _tables(n: int, seed: int = 3) -> dict[int, EditTable]:
    g = torch.Generator().manual_seed(seed)
    return {L: EditTable(torch.randint(0, D_SAE, (n, 3), generator=g),
                         torch.randint(0, 5, (n, 3), generator=g), torch.randn(n, 3, generator=g))
            for L in LAYERS}


def _runtimes(folder: Path) -> list[FeatureRuntime]:
    return [open_runtime(folder, RuntimeConfig(backend="torch")),
            open_runtime(folder, RuntimeConfig(backend="onnxruntime"))]


@pytest.mark.parametrize("n_tokens", [0, 1, 37])
def test_backends_agree_with_each_other_and_the_resae(folder: tuple[ReSAE, Path],
                                                      n_tokens: int) -> None:
    resae, out = folder
    acts, tables = tiny_acts(n_tokens, seed=5), _tables(n_tokens)
    watch = {LAYERS[0]: [0, 5, 31], LAYERS[1]: torch.tensor([7])}
    with torch.no_grad():
        dense = resae.encode_dense(acts)  # watched features read the dense code
        sparse = {L: torch.zeros(n_tokens, D_SAE).scatter(1, c.indices, c.values)
                  for L, c in resae.encode(acts).items()}  # top-k truncated (ReLU, JumpReLU)
        want_delta = resae.intervention_deltas(acts, tables)  # residual layer reads h + δ
    for runtime in _runtimes(out):
        encoded = runtime.encode(acts, watch)
        for L in LAYERS:
            indices, values = encoded.codes[L]
            assert indices.dtype == torch.int64 and values.shape == (n_tokens, 4)
            assert torch.all(values[:, :-1] >= values[:, 1:])  # sorted, strongest first
            z = torch.zeros(n_tokens, D_SAE).scatter(1, indices, values)
            torch.testing.assert_close(z, sparse[L], atol=1e-5, rtol=0)
            ids = torch.as_tensor(watch[L])
            torch.testing.assert_close(encoded.watched[L], dense[L][:, ids], atol=1e-5, rtol=0)
        deltas = runtime.intervention_deltas(acts, tables)
        for L in LAYERS:
            torch.testing.assert_close(deltas[L], want_delta[L], atol=1e-5, rtol=0)
        with torch.no_grad():
            want = resae.decode(encoded.codes)
        got = runtime.decode(encoded.codes)
        for L in LAYERS:
            torch.testing.assert_close(got[L], want[L], atol=1e-5, rtol=0)


def test_layers_without_edits_or_watch_get_zeros_and_empty(folder: tuple[ReSAE, Path]) -> None:
    _, out = folder
    acts = tiny_acts(4)
    tables = {LAYERS[1]: _tables(4)[LAYERS[1]]}
    for runtime in _runtimes(out):
        assert torch.count_nonzero(runtime.intervention_deltas(acts, tables)[LAYERS[0]]) == 0
        assert runtime.encode(acts).watched[LAYERS[0]].shape == (4, 0)


def test_float16_onnxruntime_is_close_to_float32(folder: tuple[ReSAE, Path]) -> None:
    resae, out = folder
    acts = tiny_acts(16, seed=9)
    half = open_runtime(out, RuntimeConfig(backend="onnxruntime", precision="float16"))
    got = half.decode(half.encode(acts).codes)
    with torch.no_grad():
        want = resae.decode(resae.encode(acts))  # top-k codes, as the runtime returns
    for L in LAYERS:
        assert got[L].dtype == torch.float16
        scale = float(want[L].abs().max())
        assert float((got[L].float() - want[L]).abs().max()) <= 1e-2 + 1e-2 * scale


def test_auto_is_onnxruntime_on_cpu(folder: tuple[ReSAE, Path]) -> None:
    runtime = open_runtime(folder[1])
    assert isinstance(runtime, OnnxRuntime) and runtime.backend == "onnxruntime"
    assert isinstance(TorchRuntime(folder[0]), TorchRuntime)


def test_inputs_are_checked_the_same_way_by_every_backend(folder: tuple[ReSAE, Path]) -> None:
    _, out = folder
    acts = tiny_acts(3)
    for runtime in _runtimes(out):
        with pytest.raises(InterventionError, match=r"layers \[3\] are missing"):
            runtime.encode({LAYERS[0]: acts[LAYERS[0]]})
        with pytest.raises(InterventionError, match=rf"same \(tokens, {D_MODEL}\)"):
            runtime.encode({L: a[:, :5] for L, a in acts.items()})
        with pytest.raises(InterventionError, match=r"watched feature ids at layer 1 must lie"):
            runtime.encode(acts, {LAYERS[0]: [D_SAE]})
        with pytest.raises(InterventionError, match=r"watch names layers \[2\]"):
            runtime.encode(acts, {2: [0]})
        bad_op = EditTable(torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), 9),
                           torch.zeros(3, 1))
        with pytest.raises(InterventionError, match="EditOp values"):
            runtime.intervention_deltas(acts, {LAYERS[0]: bad_op})
        with pytest.raises(InterventionError, match=r"code indices at layer 1 must lie in 0\.\.31"):
            runtime.decode({L: SparseCodes(torch.full((3, 2), D_SAE), torch.ones(3, 2))
                            for L in LAYERS})


def test_config_and_missing_gpu_errors(folder: tuple[ReSAE, Path]) -> None:
    with pytest.raises(ExportError, match="backend='tvm'; allowed: auto, torch"):
        RuntimeConfig(backend="tvm")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="device='tpu'"):
        RuntimeConfig(device="tpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the missing-provider path cannot be shown")
    manifest = read_export_manifest(folder[1])
    with pytest.raises(MissingDependencyError, match="CUDAExecutionProvider"):
        OnnxRuntime(manifest, RuntimeConfig(backend="onnxruntime", device="cuda"))
    with pytest.raises(ExportError, match="tensorrt"):
        open_runtime(folder[1], RuntimeConfig(backend="tensorrt", device="cuda"))


@pytest.mark.gpu
def test_cuda_backends_agree(folder: tuple[ReSAE, Path]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _, out = folder
    acts = {L: a.cuda() for L, a in tiny_acts(64).items()}
    reference = open_runtime(out, RuntimeConfig(backend="torch", device="cuda")).encode(acts)
    for backend in ("onnxruntime", "tensorrt"):
        try:
            runtime = open_runtime(out, RuntimeConfig(backend=backend, device="cuda"))
        except MissingDependencyError as exc:
            pytest.skip(str(exc))
        got = runtime.encode(acts)
        for L in LAYERS:
            assert got.codes[L].values.is_cuda
            torch.testing.assert_close(got.codes[L].values, reference.codes[L].values,
                                       atol=1e-4, rtol=0)
