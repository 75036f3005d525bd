"""Dictionary folders: bitwise round trip, and clear refusals of anything damaged or foreign."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from resae_serve.artifact import (
    MANIFEST,
    SCHEMA_VERSION,
    ArtifactError,
    load_artifact,
    read_manifest,
    save_artifact,
)
from resae_serve.cache import sha256_file
from resae_serve.context import TrainingContext
from resae_serve.resae import ReSAE
from tests.unit.resae_fixtures import IDENTITY, tiny_acts, tiny_resae


def _save(tmp_path: Path, resae: ReSAE | None = None) -> Path:
    return save_artifact(resae or tiny_resae(), tmp_path / "dict", IDENTITY,
                         training={"note": "test"})


def _edit_manifest(folder: Path, **changes: object) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("mode", ["resae", "layerwise"])
def test_round_trip_is_bitwise(tmp_path: Path, mode: str) -> None:
    resae = tiny_resae(mode)  # type: ignore[arg-type]
    loaded, manifest = load_artifact(_save(tmp_path, resae), expect_fingerprint="sha256:tiny")
    assert manifest.layers == resae.layers and manifest.mode == mode
    assert manifest.model == IDENTITY and manifest.training == {"note": "test"}
    original, restored = resae.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor, restored[key]), key


def test_batchtopk_is_saved_as_jumprelu(tmp_path: Path) -> None:
    resae = tiny_resae("layerwise", architecture="batchtopk")
    loaded, manifest = load_artifact(_save(tmp_path, resae))
    assert [c.architecture for c in manifest.sae_configs] == ["jumprelu", "jumprelu"]
    acts = tiny_acts()
    inference = [sae.inference_sae() for sae in resae.saes]
    for i, layer in enumerate(resae.layers):
        s = float(resae.scales[i])
        want = s * inference[i].decode(inference[i].encode(acts[layer] / s))
        torch.testing.assert_close(loaded(acts)[layer], want, atol=0, rtol=0)


def test_corrupted_file_is_refused_by_checksum(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    path = folder / "sae.3.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"sae\.3\.safetensors is corrupted"):
        load_artifact(folder)


def test_non_finite_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    path = folder / "sae.1.safetensors"
    tensors = load_file(str(path))
    tensors["b_dec"][2] = float("nan")
    save_file(tensors, str(path))
    files = json.loads((folder / MANIFEST).read_text())["files"]
    files[path.name] = sha256_file(path)
    _edit_manifest(folder, files=files)
    with pytest.raises(ArtifactError, match=r"sae\.1\.safetensors: tensor 'b_dec' has 1 non-fin"):
        load_artifact(folder)
    tensors["b_dec"] = torch.zeros(5)
    save_file(tensors, str(path))
    files[path.name] = sha256_file(path)
    _edit_manifest(folder, files=files)
    with pytest.raises(ArtifactError, match=r"sae\.1\.safetensors.*b_dec"):
        load_artifact(folder)


def test_wrong_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="trained on a different model"):
        load_artifact(_save(tmp_path), expect_fingerprint="sha256:other")


def test_manifest_problems_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a resae dictionary folder"):
        read_manifest(tmp_path)
    folder = _save(tmp_path)
    _edit_manifest(folder, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(ArtifactError, match="newer resae-serve"):
        read_manifest(folder)
    _edit_manifest(folder, schema_version=SCHEMA_VERSION, mode="fancy")
    with pytest.raises(ArtifactError, match="field 'mode' is 'fancy'"):
        read_manifest(folder)
    _edit_manifest(folder, mode="resae", layers=[3, 1])
    with pytest.raises(ArtifactError, match="field 'layers'"):
        read_manifest(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(folder)


def test_schema_0_is_upgraded(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["schema_version"] = 0
    manifest["d_in"] = manifest.pop("d_model")
    manifest["sigmas"] = manifest.pop("scales")
    del manifest["hook"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    loaded, parsed = load_artifact(folder)
    assert parsed.schema_version == SCHEMA_VERSION and parsed.d_model == 8
    assert loaded.scales.tolist() == [2.0, 0.5]


def test_training_context_round_trips_and_old_manifests_get_the_default(tmp_path: Path) -> None:
    context = TrainingContext(True, True, 10.0, (101.5, 230.25), source="training")
    folder = save_artifact(tiny_resae(), tmp_path / "d", IDENTITY, context=context)
    assert read_manifest(folder).context == context
    assert load_artifact(folder)[1].context == context
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["training_context"]["reference_norms"] == [101.5, 230.25]
    # a manifest written before the section existed: documented default, first position only
    del raw["training_context"]
    (folder / "manifest.json").write_text(json.dumps(raw))
    old = read_manifest(folder).context
    assert old == TrainingContext.unknown() and old.skips_first_position
    assert old.norm_limit(0) is None
    assert old.reasons(0, [0, 1, 2], [1.0, 1e6, 1.0]).tolist() == [1, 0, 0]
    assert context.reasons(1, [0, 1, 2], [1.0, 2302.6, 2302.4]).tolist() == [1, 2, 0]


def test_bad_training_context_is_named(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    _edit_manifest(folder, training_context={"reference_norms": [1.0]})
    with pytest.raises(ArtifactError, match="reference_norms has 1 entries for 2 layers"):
        read_manifest(folder)
    _edit_manifest(folder, training_context={"outlier_norm_ratio": 0.5})
    with pytest.raises(ArtifactError, match=r"outlier_norm_ratio=0\.5; must be > 1"):
        read_manifest(folder)
    _edit_manifest(folder, training_context={"skip_bos": "yes"})
    with pytest.raises(ArtifactError, match=r"training_context.skip_bos='yes'"):
        read_manifest(folder)
    with pytest.raises(ArtifactError, match="reference_norms has 3 entries"):
        save_artifact(tiny_resae(), tmp_path / "e", IDENTITY,
                      context=TrainingContext(True, True, 10.0, (1.0, 2.0, 3.0)))
