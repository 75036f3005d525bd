"""Gemma Scope import: codes equal the JumpReLU encode (reference formula; SAELens' own Gemma
Scope loader if present), layers from the path or given, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resae_serve.artifact import ArtifactError, ModelIdentity, load_artifact
from resae_serve.importers import import_dictionary
from tests.unit.import_fixtures import (
    ATOL,
    D_MODEL,
    D_SAE,
    activations,
    gemmascope_encode,
    write_gemmascope_fixture,
)

MODEL = ModelIdentity(name="tiny", fingerprint="sha256:tiny", model_type="gemma2", n_layers=4,
                      d_model=D_MODEL)


def _codes(dictionary: Path, layer: int, x: torch.Tensor) -> torch.Tensor:
    resae, manifest = load_artifact(dictionary)
    assert manifest.layers == (layer,)
    with torch.no_grad():
        return resae.encode_dense({layer: x})[layer].double()


def test_codes_equal_gemma_scope_encode(tmp_path: Path) -> None:
    path = write_gemmascope_fixture(tmp_path / "gemma-scope-2b-pt-res", layer=3)
    out = import_dictionary("gemmascope", [path.parent], tmp_path / "dict", model=MODEL)
    x = activations()
    expected = gemmascope_encode(path, x)
    assert (expected > 0).sum(dim=-1).float().mean() > 1
    torch.testing.assert_close(_codes(out, 3, x), expected, atol=ATOL, rtol=0)
    manifest = load_artifact(out)[1]
    assert manifest.sae_configs[0].architecture == "jumprelu"
    assert manifest.training["hooks"] == {"3": "blocks.3.hook_resid_post"}


def test_codes_equal_sae_lens_gemma_scope_loader(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SAELens' ``gemma_2_sae_huggingface_loader`` reads the file (the hub download replaced by
    the local path) into its JumpReLUSAE, as ``SAE.from_pretrained`` would."""
    sae_lens = pytest.importorskip("sae_lens")
    loaders = pytest.importorskip("sae_lens.loading.pretrained_sae_loaders")
    path = write_gemmascope_fixture(tmp_path, layer=2, seed=4)
    monkeypatch.setattr(loaders, "hf_hub_download", lambda **_: str(path))
    cfg, state, _ = loaders.gemma_2_sae_huggingface_loader(
        repo_id="google/gemma-scope-2b-pt-res", folder_name="layer_2/width_16k/average_l0_71",
        cfg_overrides={"d_in": D_MODEL, "d_sae": D_SAE})
    assert cfg["hook_name"] == "blocks.2.hook_resid_post"  # SAELens reads the path as we do
    cfg = loaders.handle_config_defaulting(cfg)
    sae = sae_lens.SAE.from_dict(cfg)
    sae.load_state_dict(state)
    x = activations()
    with torch.no_grad():
        expected = sae.encode(x).double()
    torch.testing.assert_close(expected, gemmascope_encode(path, x), atol=ATOL, rtol=0)
    out = import_dictionary("gemmascope", [path], tmp_path / "dict", model=MODEL)
    torch.testing.assert_close(_codes(out, 2, x), expected, atol=ATOL, rtol=0)


def test_layers_option(tmp_path: Path) -> None:
    path = tmp_path / "params.npz"
    write_gemmascope_fixture(tmp_path / "src", layer=1).rename(path)
    with pytest.raises(ArtifactError, match="which layer"):
        import_dictionary("gemmascope", [path], tmp_path / "dict", model=MODEL)
    out = import_dictionary("gemmascope", [path], tmp_path / "dict", model=MODEL, layers=[2])
    assert load_artifact(out)[1].layers == (2,)
    in_layer_dir = write_gemmascope_fixture(tmp_path / "src", layer=3)
    with pytest.raises(ArtifactError, match="ambiguous"):
        import_dictionary("gemmascope", [in_layer_dir], tmp_path / "d2", model=MODEL,
                          layers=[1])
    with pytest.raises(ArtifactError, match="outside model"):
        import_dictionary("gemmascope", [path], tmp_path / "d3", model=MODEL, layers=[4])


def test_several_layers_sorted_and_k(tmp_path: Path) -> None:
    paths = [write_gemmascope_fixture(tmp_path, layer=layer, seed=layer) for layer in (3, 0)]
    out = import_dictionary("gemmascope", paths, tmp_path / "dict", model=MODEL, k=5)
    resae, manifest = load_artifact(out)
    assert manifest.layers == (0, 3) and [c.k for c in manifest.sae_configs] == [5, 5]
    x = activations()
    with torch.no_grad():
        codes = resae.encode_dense({0: x, 3: x})
    for path, layer in zip(paths, (3, 0), strict=True):
        torch.testing.assert_close(codes[layer].double(), gemmascope_encode(path, x),
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("release", ["gemma-scope-2b-pt-mlp", "gemma-scope-9b-pt-att",
                                     "gemma-scope-2b-pt-transcoders",
                                     "gemma-scope-2b-pt-mlp-canonical"])
def test_other_releases_refused(tmp_path: Path, release: str) -> None:
    path = write_gemmascope_fixture(tmp_path / release, layer=1)
    with pytest.raises(ArtifactError, match=f"{release}.*allowed"):
        import_dictionary("gemmascope", [path], tmp_path / "dict", model=MODEL)


def test_bad_files_refused(tmp_path: Path) -> None:
    path = write_gemmascope_fixture(tmp_path, layer=1)
    with np.load(path) as data:
        arrays = dict(data)
    np.savez(path, **{k: v for k, v in arrays.items() if k != "threshold"})
    with pytest.raises(ArtifactError, match="'threshold' is missing") as info:
        import_dictionary("gemmascope", [path], tmp_path / "dict", model=MODEL)
    assert str(path) in str(info.value)
    np.savez(path, **arrays, b_mag=arrays["b_enc"])
    with pytest.raises(ArtifactError, match=r"unexpected arrays.*b_mag"):
        import_dictionary("gemmascope", [path], tmp_path / "dict", model=MODEL)
    path.write_text("not a zip")
    with pytest.raises(ArtifactError, match="cannot read"):
        import_dictionary("gemmascope", [path], tmp_path / "dict", model=MODEL)
    with pytest.raises(ArtifactError, match=r"params\.npz is missing"):
        import_dictionary("gemmascope", [tmp_path], tmp_path / "dict", model=MODEL)


def test_scaling_factor_folded_into_decoder(tmp_path: Path) -> None:
    path = write_gemmascope_fixture(tmp_path, layer=1)
    with np.load(path) as data:
        arrays = dict(data)
    factor = np.linspace(0.5, 2.0, D_SAE, dtype=np.float32)
    np.savez(path, **arrays, scaling_factor=factor)
    out = import_dictionary("gemmascope", [path], tmp_path / "dict", model=MODEL)
    sae = load_artifact(out)[0].saes[0]
    x = activations()
    torch.testing.assert_close(_codes(out, 1, x), gemmascope_encode(path, x), atol=ATOL, rtol=0)
    expected_rows = torch.from_numpy(arrays["W_dec"] * factor[:, None])
    torch.testing.assert_close(sae.W_dec.detach(), expected_rows, atol=1e-6, rtol=1e-6)
