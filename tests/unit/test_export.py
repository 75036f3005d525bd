"""ONNX export: graph contract, parity with the torch ReSAE, strict validation, portability.

Each (mode, architecture) dictionary is exported once per module; exports take seconds.
Parity (onnxruntime CPU): float32 max |err| <= 1e-4 with top-k indices identical except at
exact ties (tie window 0); float16 within the default float16 tolerance, measured here at
<= 5e-3 of each output's magnitude.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from resae_serve import __version__
from resae_serve.artifact import load_artifact, save_artifact
from resae_serve.capture import ActivationBatch
from resae_serve.export.convert import export_artifact
from resae_serve.export.errors import ExportError, MissingDependencyError, ParityError
from resae_serve.export.folder import read_export_manifest
from resae_serve.export.probes import captured_activations
from resae_serve.export.spec import EXPORT_MANIFEST, ExportConfig, Tolerance, graph_spec
from resae_serve.export.validate import validate_export
from resae_serve.shards import write_shards
from tests.unit.resae_fixtures import D_MODEL, IDENTITY, LAYERS, K, tiny_acts, tiny_resae

EXACT = Tolerance(atol=1e-4, rtol=0.0, tie_window=0.0)
COMBOS = [("resae", "topk"), ("layerwise", "topk"), ("resae", "batchtopk"),
          ("layerwise", "batchtopk"), ("resae", "relu"), ("layerwise", "relu")]


def export_tiny(root: Path, mode: str = "resae", architecture: str = "topk",
                config: ExportConfig | None = None) -> tuple[Path, Path]:
    """Save a tiny dictionary under ``root`` and export it; returns (artifact, export) dirs."""
    artifact = save_artifact(tiny_resae(mode, architecture),  # type: ignore[arg-type]
                             root / "dict", IDENTITY)
    export_artifact(artifact, root / "export", config or ExportConfig())
    return artifact, root / "export"


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c) for c in COMBOS])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Path]:
    mode, arch = request.param
    return export_tiny(tmp_path_factory.mktemp(f"{mode}-{arch}"), mode, arch)


@pytest.fixture(scope="module")
def exported_fp16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return export_tiny(tmp_path_factory.mktemp("fp16"), "resae", "topk",
                       ExportConfig(precisions=("float32", "float16")))


def test_float32_parity_is_exact_but_for_ties(exported: tuple[Path, Path]) -> None:
    _, out = exported
    report = validate_export(out, tolerances={"float32": EXACT})
    graphs = {c.graph for c in report.checks}
    assert graphs == {"encode", "intervention", "decode", "encode_layer"} and report.passed
    assert max(c.max_abs for c in report.checks) <= 1e-4
    for check in report.checks:
        assert check.index_mismatch_tokens == 0
        if check.output.startswith("indices_"):
            assert check.tie_tokens == check.exact_tie_tokens  # only exact ties differ
    recorded = json.loads((out / EXPORT_MANIFEST).read_text())["validation"]
    assert recorded["passed"] and len(recorded["checks"]) == len(report.checks)


def test_graphs_have_the_spec_names_dynamic_tokens_and_metadata(
        exported: tuple[Path, Path]) -> None:
    artifact, out = exported
    manifest = read_export_manifest(out)
    resae, _ = load_artifact(artifact)
    assert [g.file for g in manifest.graphs] == [
        "encode.onnx", "intervention.onnx", "decode.onnx",
        *(f"encode_layer.L{L}.onnx" for L in LAYERS)]
    for entry in manifest.graphs:
        model = onnx.load(str(out / entry.file))
        spec = graph_spec(entry.spec.name, manifest.layout, layer=entry.spec.layer)
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        assert model.opset_import[0].version >= 18
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param == "tokens"
        props = {p.key: p.value for p in model.metadata_props}
        assert props["resae.fingerprint"] == manifest.fingerprint
        assert json.loads(props["resae.layers"]) == list(LAYERS)
        assert props["resae.export_schema_version"] == "2"
        assert props["resae.package_version"] == __version__
        assert props["resae.model_fingerprint"] == IDENTITY.fingerprint
        assert props["resae.graph"] == entry.spec.name
        assert props.get("resae.layer") == (None if entry.spec.layer is None
                                            else str(entry.spec.layer))
    encode = graph_spec("encode", manifest.layout)
    assert encode.input_names == ["h_1", "h_3", "watch_1", "watch_3"]
    assert encode.output_names == ["indices_1", "values_1", "watched_1",
                                   "indices_3", "values_3", "watched_3"]
    assert manifest.layout.k == (K, K) and manifest.layout.mode == resae.mode
    residual = resae.mode == "resae"     # the per-layer graph of a residualized layer
    assert graph_spec("encode_layer", manifest.layout, layer=LAYERS[1]).input_names == (
        ["h", "h_prev", "watch"] if residual else ["h", "watch"])
    assert graph_spec("encode_layer", manifest.layout, layer=LAYERS[0]).output_names == [
        "indices", "values", "watched"]


def test_float16_is_within_its_stated_tolerance(exported_fp16: tuple[Path, Path]) -> None:
    _, out = exported_fp16
    report = validate_export(out)  # default tolerances: float16 atol 1e-2 + rtol 1e-2 · max
    fp16 = [c for c in report.checks if c.precision == "float16"]
    assert len(fp16) == 2 * (3 * 2 + 2 + 2 + 3 * 2) and report.passed   # + encode_layer
    assert max(c.max_rel for c in fp16) <= 5e-3
    assert all(c.index_mismatch_tokens == 0 for c in fp16)


def test_impossible_tolerance_raises_with_the_worst_difference(
        exported_fp16: tuple[Path, Path]) -> None:
    _, out = exported_fp16
    with pytest.raises(ParityError, match=r"\(float16\) output 'indices_\d' .* select other "
                       r"latents than torch away from any tie; token \d+: latents"):
        validate_export(out, tolerances={"float16": Tolerance(0.0, 0.0)}, record=False)
    # Ties allowed everywhere: now the values fail, stating the worst difference.
    with pytest.raises(ParityError, match=r"\(float16\) output '\w+' on [\w-]+ activations: "
                       r"max \|ours − torch\| = .*token \d+, column \d+: ours .*, torch"):
        validate_export(out, tolerances={"float16": Tolerance(0.0, 0.0, tie_window=1e9)},
                        record=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_broken_graph_fails_validation(exported_fp16: tuple[Path, Path],
                                         tmp_path: Path) -> None:
    artifact, src = exported_fp16
    resae, _ = load_artifact(artifact)
    out = _copy(src, tmp_path / "broken")
    model = onnx.load(str(out / "decode.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(init).copy()
    array.flat[0] += 0.5  # one wrong weight
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(out / "decode.onnx"))
    with pytest.raises(ParityError, match=r"decode .*reconstruction_"):
        validate_export(out, resae, record=False)


def test_renamed_output_fails_on_names(exported_fp16: tuple[Path, Path],
                                       tmp_path: Path) -> None:
    artifact, src = exported_fp16
    out = _copy(src, tmp_path / "renamed")
    model = onnx.load(str(out / "encode.onnx"))
    old = model.graph.output[1].name
    for node in model.graph.node:
        node.input[:] = ["values" if name == old else name for name in node.input]
        node.output[:] = ["values" if name == old else name for name in node.output]
    model.graph.output[1].name = "values"
    onnx.save(model, str(out / "encode.onnx"))
    with pytest.raises(ParityError, match=r"encode.onnx: outputs .* unexpected \['values'\]"):
        validate_export(out, load_artifact(artifact)[0], record=False)


def test_external_data_and_config_errors(tmp_path: Path) -> None:
    _, out = export_tiny(tmp_path, config=ExportConfig(graphs=("encode",), external_data=True))
    entry = read_export_manifest(out).graph("encode")
    assert entry.external_data == "encode.onnx.data" and (out / entry.external_data).is_file()
    assert validate_export(out, tolerances={"float32": EXACT}).passed
    with pytest.raises(ExportError, match="float32 must be included"):
        ExportConfig(precisions=("float16",))
    with pytest.raises(ExportError, match="opset=17"):
        ExportConfig(opset=17)
    with pytest.raises(ExportError, match="no decode graph in float32"):
        read_export_manifest(out).graph("decode")


def test_tensorrt_absent_is_a_clear_error(exported_fp16: tuple[Path, Path]) -> None:
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed: the missing-package path cannot be shown")
    from resae_serve.export.trt_engine import build_engines

    with pytest.raises(MissingDependencyError, match=r"pip install 'resae-serve\[gpu\]'"):
        build_engines(read_export_manifest(exported_fp16[1]))


PORTABLE = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    sys.modules["resae_serve"] = None
    try:
        import torch  # noqa
    except ImportError:
        pass
    else:
        raise SystemExit("torch was importable")
    from pathlib import Path
    import numpy as np
    import onnxruntime as ort

    folder = Path(sys.argv[1])
    ref = folder / "reference" / "encode"
    session = ort.InferenceSession(str(folder / "encode.onnx"),
                                   providers=["CPUExecutionProvider"])
    feeds = {i.name: np.load(ref / f"input.{i.name}.npy") for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    for name, got in zip(names, session.run(names, feeds)):
        want = np.load(ref / f"output.{name}.npy")
        if name.startswith("indices_"):
            assert np.array_equal(got, want), name
        else:
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=name)
    print("reproduced", len(names), "outputs of", len(feeds["h_1"]), "tokens")
""")


def test_encode_graph_runs_without_torch(exported_fp16: tuple[Path, Path]) -> None:
    _, out = exported_fp16
    result = subprocess.run([sys.executable, "-c", PORTABLE, str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reproduced 6 outputs of 16 tokens" in result.stdout


def test_captured_activations_add_a_real_probe(exported_fp16: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    acts = tiny_acts(40, seed=4)
    captured = {0: 3 * torch.randn(40, D_MODEL), **acts}  # layer 0 is not in the dictionary
    stacked = torch.stack([captured[L] for L in (0, *LAYERS)], dim=1)
    n = torch.arange(40)
    write_shards([ActivationBatch(stacked, n, n, n)], tmp_path / "shards", layers=(0, *LAYERS),
                 tokens_per_shard=16)
    real = captured_activations(tmp_path / "shards", LAYERS, 30)
    assert all(torch.equal(real[L], acts[L][:30]) for L in LAYERS)
    report = validate_export(exported_fp16[1], real_acts=real, record=False)
    assert {c.probe for c in report.checks} == {"random", "real-scale", "real"}
    assert {c.tokens for c in report.checks if c.probe == "real"} == {30}
    with pytest.raises(ExportError, match=r"the dictionary also needs \[5\]"):
        captured_activations(tmp_path / "shards", (1, 5), 4)
