"""Exports built on demand for serving: cached by fingerprint, built once, never stale; and
the choice of the feature runtime (``--runtime``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resae_serve.artifact import save_artifact
from resae_serve.engine import runtime_choice
from resae_serve.engine.runtime_choice import (
    RuntimeUnavailableError,
    choose_runtime,
    prepare_export,
    served_folders,
)
from resae_serve.export import cache
from resae_serve.export.cache import StaleExportError, cache_key, cached_export
from resae_serve.export.folder import dictionary_fingerprint
from resae_serve.export.spec import EXPORT_MANIFEST, EXPORT_SCHEMA_VERSION
from resae_serve.server.config import (
    EngineSettings,
    ServerConfig,
    ServerConfigError,
    check_runtime,
    with_served_folders,
)
from tests.unit.resae_fixtures import IDENTITY, tiny_resae

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install onnxruntime)")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A dictionary, the cache root and its cached export (built once for the module)."""
    root = tmp_path_factory.mktemp("cache")
    dictionary = save_artifact(tiny_resae(), root / "dict", IDENTITY)
    manifest = cached_export(dictionary, root=root / "exports")
    return dictionary, root / "exports", manifest.folder


def _edit_manifest(folder: Path, edit: dict[str, object]) -> None:
    path = folder / EXPORT_MANIFEST
    raw = json.loads(path.read_text())
    for key, value in edit.items():
        section, _, field = key.partition(".")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    path.write_text(json.dumps(raw))


def test_built_once_keyed_by_fingerprint_validated_and_reused(
        built: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    dictionary, root, folder = built
    fingerprint = dictionary_fingerprint(tiny_resae())
    assert folder == root / cache_key(fingerprint)
    assert folder.name.endswith(f"-v{EXPORT_SCHEMA_VERSION}")
    raw = json.loads((folder / EXPORT_MANIFEST).read_text())
    assert raw["fingerprint"] == fingerprint and raw["validation"]["passed"]
    assert {g["graph"] for g in raw["graphs"]} >= {"encode", "encode_layer"}
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [folder.name]

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(cache, "export_artifact", no_export)
    assert cached_export(dictionary, root=root).folder == folder       # reused, not rebuilt


def test_a_copy_of_the_dictionary_shares_the_export(built: tuple[Path, Path, Path],
                                                    tmp_path: Path) -> None:
    _, root, folder = built
    copy = save_artifact(tiny_resae(), tmp_path / "elsewhere", IDENTITY)
    assert cached_export(copy, root=root).folder == folder             # content, not path


@pytest.mark.parametrize(("edit", "field"), [
    ({"fingerprint": "sha256:" + "0" * 64}, "'fingerprint'"),
    ({"layout.layers": [1, 2]}, "'layout.layers'"),
    ({"layout.d_sae": [8, 8]}, "'layout.d_sae'"),
])
def test_a_stale_export_is_refused_naming_the_field(built: tuple[Path, Path, Path],
                                                    tmp_path: Path, edit: dict[str, object],
                                                    field: str) -> None:
    import shutil

    dictionary, _, folder = built
    stale_root = tmp_path / "exports"
    shutil.copytree(folder, stale_root / folder.name)
    _edit_manifest(stale_root / folder.name, edit)
    with pytest.raises(StaleExportError, match=f"field {field}.*delete .* to rebuild"):
        cached_export(dictionary, root=stale_root)
    # the same check for an export folder given to serve
    with pytest.raises(StaleExportError, match=f"field {field}"):
        prepare_export(dictionary, stale_root / folder.name)


def test_an_export_folder_serves_the_dictionary_it_names(built: tuple[Path, Path, Path]) -> None:
    dictionary, _, folder = built
    assert served_folders(dictionary) == (dictionary, None)
    source, export = served_folders(folder)
    assert source.resolve() == dictionary.resolve() and export == folder
    assert prepare_export(source, export) == folder
    config = with_served_folders(ServerConfig(dictionary=folder))
    assert config.export == folder and Path(config.dictionary).resolve() == dictionary.resolve()
    with pytest.raises(ServerConfigError, match=r"export folder, and export=.* names another"):
        with_served_folders(ServerConfig(dictionary=folder, export=dictionary))


def test_an_export_of_a_missing_dictionary_is_refused(built: tuple[Path, Path, Path],
                                                      tmp_path: Path) -> None:
    import shutil

    _, _, folder = built
    moved = tmp_path / "export"
    shutil.copytree(folder, moved)
    _edit_manifest(moved, {"artifact.path": str(tmp_path / "gone")})
    with pytest.raises(ServerConfigError, match=r"field 'artifact\.path' names the dictionary"):
        with_served_folders(ServerConfig(dictionary=moved))


# ----------------------------------------------------------------------------- --runtime

def test_auto_is_onnxruntime_on_a_cpu_host_and_torch_is_always_allowed() -> None:
    assert choose_runtime("auto", cuda=False)[:2] == ("onnxruntime", "cpu")
    assert choose_runtime("torch", cuda=False).backend == "torch"
    assert choose_runtime("onnxruntime", cuda=False)[:2] == ("onnxruntime", "cpu")
    assert check_runtime(ServerConfig(dictionary=Path("d")), cuda=False) == "onnxruntime"


def test_a_runtime_that_cannot_run_is_refused_naming_the_flag() -> None:
    with pytest.raises(RuntimeUnavailableError, match=r"runtime='tensorrt' \(--runtime\) cannot "
                       r"run on this CPU host: TensorRT needs a CUDA GPU; allowed here: auto, "
                       r"torch, onnxruntime"):
        choose_runtime("tensorrt", cuda=False)
    config = ServerConfig(dictionary=Path("d"), engine=EngineSettings(runtime="tensorrt"))
    with pytest.raises(ServerConfigError, match=r"--runtime"):
        check_runtime(config, cuda=False)
    with pytest.raises(ServerConfigError, match=r"engine.runtime='tvm' \(--runtime\); allowed: "
                       "auto, torch, onnxruntime, tensorrt"):
        EngineSettings(runtime="tvm")


def test_auto_falls_back_to_torch_saying_why(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime_choice, "_installed", lambda name: name != "onnxruntime")
    with caplog.at_level("WARNING", logger=runtime_choice.__name__):
        choice = choose_runtime("auto", cuda=False)
    assert choice.backend == "torch" and "onnxruntime is not installed" in choice.reason
    assert "feature runtime torch (auto on a CPU host: onnxruntime is not installed" in caplog.text
    with pytest.raises(RuntimeUnavailableError, match="onnxruntime is not installed"):
        choose_runtime("onnxruntime", cuda=False)
    monkeypatch.setattr(runtime_choice, "_installed", lambda name: name != "onnxscript")
    assert "the ONNX exporter (onnx, onnxscript) is not installed" in choose_runtime(
        "auto", cuda=False).reason


def test_auto_on_a_gpu_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT when installed, else onnxruntime with a GPU provider, else torch."""
    monkeypatch.setattr(runtime_choice, "_ort_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime_choice, "_installed", lambda name: name != "onnxruntime")
    assert choose_runtime("auto", cuda=True).backend == "tensorrt"
    monkeypatch.setattr(runtime_choice, "_installed", lambda name: name != "tensorrt")
    assert choose_runtime("auto", cuda=True)[:2] == ("onnxruntime", "auto")
    monkeypatch.setattr(runtime_choice, "_ort_providers", lambda: ["CPUExecutionProvider"])
    choice = choose_runtime("auto", cuda=True)
    assert choice.backend == "torch" and "pip install 'resae-serve[gpu]'" in choice.reason
    with pytest.raises(RuntimeUnavailableError, match="no CUDA or TensorRT execution provider"):
        choose_runtime("onnxruntime", cuda=True)


def test_the_demo_refreshes_a_missing_or_stale_export(built: tuple[Path, Path, Path],
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from resae_serve.export import convert
    from resae_serve.server.demo import ensure_export

    dictionary, _, _ = built
    export = tmp_path / "demo.onnx"
    assert ensure_export(dictionary, export) == export               # missing: exported
    assert served_folders(export)[1] == export
    _edit_manifest(export, {"schema_version": EXPORT_SCHEMA_VERSION - 1})
    ensure_export(dictionary, export)                                # old format: again
    assert json.loads((export / EXPORT_MANIFEST).read_text())["schema_version"] == (
        EXPORT_SCHEMA_VERSION)

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(convert, "export_resae", no_export)
    assert ensure_export(dictionary, export) == export               # current: kept
