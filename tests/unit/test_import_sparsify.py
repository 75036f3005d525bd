"""sparsify import: codes equal ``SparseCoder.encode`` (reference formula; the real package if
present), hookpoint folders, checkpoint expansion, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from resae_serve.artifact import ArtifactError, ModelIdentity, load_artifact
from resae_serve.importers import import_dictionary
from tests.unit.import_fixtures import (
    ATOL,
    D_MODEL,
    D_SAE,
    K,
    activations,
    sparsify_encode,
    write_sparsify_fixture,
)

MODEL = ModelIdentity(name="tiny", fingerprint="sha256:tiny", model_type="llama", n_layers=4,
                      d_model=D_MODEL)


def _codes(dictionary: Path, layers: tuple[int, ...], x: torch.Tensor) -> dict[int, torch.Tensor]:
    resae, manifest = load_artifact(dictionary)
    assert manifest.layers == layers
    with torch.no_grad():
        return resae.encode_dense({layer: x for layer in layers})


def _real_encode(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """Dense codes of the real ``SparseCoder.load_from_disk(folder).encode(x)``."""
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder.load_from_disk(folder)
    with torch.no_grad():
        out = coder.encode(x)
    return torch.zeros(len(x), coder.num_latents).scatter_(-1, out.top_indices, out.top_acts)


def test_codes_equal_sparsify_encode(tmp_path: Path) -> None:
    folder = write_sparsify_fixture(tmp_path / "layers.2")
    out = import_dictionary("sparsify", [folder], tmp_path / "dict", model=MODEL)
    x = activations()
    got = _codes(out, (2,), x)[2]
    expected = sparsify_encode(folder, x)
    assert ((expected > 0).sum(dim=-1) == K).all()
    torch.testing.assert_close(got.double(), expected, atol=ATOL, rtol=0)
    config = load_artifact(out)[1].sae_configs[0]
    assert (config.architecture, config.d_sae, config.k) == ("topk", D_SAE, K)


def test_fixture_and_formula_match_real_sparsify(tmp_path: Path) -> None:
    """The hand-written fixture loads in sparsify and encodes as the reference formula says."""
    folder = write_sparsify_fixture(tmp_path / "layers.2", seed=3)
    x = activations()
    real = _real_encode(folder, x)
    torch.testing.assert_close(real.double(), sparsify_encode(folder, x), atol=ATOL, rtol=0)
    out = import_dictionary("sparsify", [folder], tmp_path / "dict", model=MODEL)
    torch.testing.assert_close(_codes(out, (2,), x)[2], real, atol=ATOL, rtol=0)


def test_checkpoint_saved_by_sparsify_imports(tmp_path: Path) -> None:
    """A trainer-style checkpoint: one folder per hookpoint plus the run's config.json."""
    sparsify = pytest.importorskip("sparsify")
    root = tmp_path / "checkpoints" / "run"
    g = torch.Generator().manual_seed(5)
    for layer in (3, 1):
        coder = sparsify.SparseCoder(D_MODEL, sparsify.SparseCoderConfig(expansion_factor=2,
                                                                          k=K))
        with torch.no_grad():
            for p in coder.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        coder.save_to_disk(root / f"layers.{layer}")
    (root / "config.json").write_text(json.dumps({"sae": {}, "hookpoints": ["layers.1"]}))
    out = import_dictionary("sparsify", [root], tmp_path / "dict", model=MODEL)
    x = activations()
    codes = _codes(out, (1, 3), x)
    for layer in (1, 3):
        expected = _real_encode(root / f"layers.{layer}", x)
        assert (expected > 0).any()
        torch.testing.assert_close(codes[layer], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("name", "layer"), [
    ("layers.0", 0), ("model.layers.3", 3), ("h.2", 2), ("gpt_neox.layers.1", 1),
])
def test_hookpoint_names(tmp_path: Path, name: str, layer: int) -> None:
    folder = write_sparsify_fixture(tmp_path / name)
    out = import_dictionary("sparsify", [folder], tmp_path / "dict", model=MODEL)
    manifest = load_artifact(out)[1]
    assert manifest.layers == (layer,) and manifest.training["hooks"] == {str(layer): name}


def test_seed_subfolder_takes_the_hookpoint_of_its_parent(tmp_path: Path) -> None:
    folder = write_sparsify_fixture(tmp_path / "layers.3" / "seed1")
    out = import_dictionary("sparsify", [folder], tmp_path / "dict", model=MODEL)
    assert load_artifact(out)[1].layers == (3,)


def test_layers_option_must_agree(tmp_path: Path) -> None:
    folder = write_sparsify_fixture(tmp_path / "layers.2")
    out = import_dictionary("sparsify", [folder], tmp_path / "dict", model=MODEL, layers=[2])
    assert load_artifact(out)[1].layers == (2,)
    with pytest.raises(ArtifactError, match="ambiguous"):
        import_dictionary("sparsify", [folder], tmp_path / "d2", model=MODEL, layers=[1])


@pytest.mark.parametrize("name", ["layers.2.mlp", "layers.2.self_attn", "embed_tokens",
                                  "my_sae"])
def test_other_hookpoints_refused(tmp_path: Path, name: str) -> None:
    folder = write_sparsify_fixture(tmp_path / name)
    with pytest.raises(ArtifactError, match="allowed") as info:
        import_dictionary("sparsify", [folder], tmp_path / "dict", model=MODEL)
    assert name in str(info.value) and str(folder / "cfg.json") in str(info.value)


@pytest.mark.parametrize(("changes", "message"), [
    ({"skip_connection": True}, "skip_connection"),
    ({"transcode": True}, "transcode"),
    ({"activation": "groupmax"}, "groupmax"),
    ({"signed": True}, "signed"),
    ({"k": 0}, "'k'"),
])
def test_unsupported_configs_refused(tmp_path: Path, changes: dict[str, Any],
                                     message: str) -> None:
    folder = write_sparsify_fixture(tmp_path / "layers.1", **changes)
    with pytest.raises(ArtifactError, match=message) as info:
        import_dictionary("sparsify", [folder], tmp_path / "dict", model=MODEL)
    assert str(folder) in str(info.value)


def test_d_sae_from_expansion_factor_and_shape_errors(tmp_path: Path) -> None:
    folder = write_sparsify_fixture(tmp_path / "layers.1", num_latents=2 * D_MODEL)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"num_latents": 0, "expansion_factor": 2}))
    out = import_dictionary("sparsify", [folder], tmp_path / "dict", model=MODEL)
    assert load_artifact(out)[1].sae_configs[0].d_sae == 2 * D_MODEL
    (folder / "cfg.json").write_text(json.dumps(cfg | {"num_latents": 3 * D_MODEL}))
    with pytest.raises(ArtifactError, match=r"'encoder\.weight' has shape"):
        import_dictionary("sparsify", [folder], tmp_path / "d2", model=MODEL)


def test_folder_without_sae_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"cfg\.json is missing"):
        import_dictionary("sparsify", [tmp_path / "empty"], tmp_path / "dict", model=MODEL)
    with pytest.raises(ArtifactError, match="does not exist"):
        import_dictionary("sparsify", [tmp_path / "nowhere"], tmp_path / "dict", model=MODEL)
