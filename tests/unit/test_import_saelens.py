"""SAELens import: codes equal SAELens' encode (reference formula; the real package if present),
folded options, hook mapping, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from resae_serve.artifact import ArtifactError, ModelIdentity, load_artifact
from resae_serve.context import TrainingContext
from resae_serve.importers import import_dictionary, import_saelens
from tests.unit.import_fixtures import (
    ATOL,
    D_MODEL,
    D_SAE,
    K,
    activations,
    saelens_encode,
    write_saelens_fixture,
)

MODEL = ModelIdentity(name="tiny", fingerprint="sha256:tiny", model_type="llama", n_layers=4,
                      d_model=D_MODEL)
ARCHITECTURES = ("standard", "topk", "jumprelu")


def _codes(dictionary: Path, layer: int, x: torch.Tensor) -> torch.Tensor:
    resae, _ = load_artifact(dictionary)
    with torch.no_grad():
        return resae.encode_dense({layer: x})[layer].double()


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), expected.double(), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("version", [5, 6])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_codes_equal_saelens_encode(tmp_path: Path, architecture: str, version: int,
                                    apply_b_dec_to_input: bool) -> None:
    folder = write_saelens_fixture(tmp_path / "sae", layer=2, architecture=architecture,
                                   version=version, apply_b_dec_to_input=apply_b_dec_to_input)
    out = import_saelens([folder], tmp_path / "dict", model=MODEL)
    x = activations()
    expected = saelens_encode(folder, x)
    assert (expected > 0).sum(dim=-1).float().mean() > 1  # codes actually fire
    _assert_close(_codes(out, 2, x), expected)
    config = load_artifact(out)[1].sae_configs[0]
    assert config.architecture == {"standard": "relu"}.get(architecture, architecture)
    assert config.k == (K if architecture == "topk" else 32)


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
@pytest.mark.parametrize("version", [5, 6])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_fixture_and_formula_match_real_sae_lens(tmp_path: Path, architecture: str,
                                                 version: int, apply_b_dec_to_input: bool
                                                 ) -> None:
    """The hand-written fixture loads in SAELens and encodes as the reference formula says."""
    sae_lens = pytest.importorskip("sae_lens")
    folder = write_saelens_fixture(tmp_path / "sae", layer=2, architecture=architecture,
                                   version=version, apply_b_dec_to_input=apply_b_dec_to_input)
    x = activations()
    with torch.no_grad():
        real = sae_lens.SAE.load_from_disk(str(folder)).encode(x)
    _assert_close(real, saelens_encode(folder, x))
    out = import_saelens([folder], tmp_path / "dict", model=MODEL)
    _assert_close(_codes(out, 2, x), real)


def _randomized(sae: Any, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) if p.ndim == 2 else
                    0.2 * torch.rand(p.shape, generator=g))
    return sae


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_folders_saved_by_sae_lens_import(tmp_path: Path, architecture: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig,
                        {"k": K, "rescale_acts_by_decoder_norm": True}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {})}
    cls, config_cls, extra = classes[architecture]
    config = config_cls(d_in=D_MODEL, d_sae=D_SAE, apply_b_dec_to_input=architecture != "jumprelu",
                        metadata=SAEMetadata(hook_name="blocks.3.hook_resid_pre"), **extra)
    sae = _randomized(cls(config), seed=3)
    sae.save_model(str(tmp_path / "sae"))
    out = import_saelens([tmp_path / "sae"], tmp_path / "dict", model=MODEL)
    assert load_artifact(out)[1].layers == (2,)  # resid_pre of 3 = output of block 2
    x = activations()
    with torch.no_grad():
        expected = sae_lens.SAE.load_from_disk(str(tmp_path / "sae")).encode(x)
    assert (expected > 0).any()
    _assert_close(_codes(out, 2, x), expected)


# ---------------------------------------------------------------------- normalisation


def _scaler(folder: Path, factor: float | None = None, whiten: bool = False) -> Any:
    """Save SAELens' own ActivationScaler (json + whitening safetensors) into ``folder``."""
    scaling = pytest.importorskip("sae_lens.training.activation_scaler")
    scaler = scaling.ActivationScaler(scaling_factor=factor)
    if whiten:
        g = torch.Generator().manual_seed(11)
        mixing = torch.randn(D_MODEL, D_MODEL, generator=g) / D_MODEL**0.5 + torch.eye(D_MODEL)
        batches = iter([torch.randn(256, D_MODEL, generator=g) @ mixing + 1.0
                        for _ in range(4)])
        scaler.estimate_whitening(d_in=D_MODEL, data_provider=batches,
                                  n_batches_for_norm_estimate=4)
    scaler.save(str(folder / "activation_scaler.json"))
    return scaler


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_norm_scaling_factor_folded_as_sae_lens_does(tmp_path: Path, architecture: str) -> None:
    folder = write_saelens_fixture(tmp_path / "sae", layer=1, architecture=architecture,
                                   normalize_activations="expected_average_only_in",
                                   rescale_acts_by_decoder_norm=architecture == "topk")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37}))
    out = import_saelens([folder], tmp_path / "dict", model=MODEL)
    x = activations()
    got = _codes(out, 1, x)
    sae_lens = pytest.importorskip("sae_lens")  # without it: the reference test below
    with torch.no_grad():
        sae = sae_lens.SAE.load_from_disk(str(folder))
        sae.fold_activation_norm_scaling_factor(0.37)
        _assert_close(got, sae.encode(x))


@pytest.mark.parametrize(("architecture", "apply_b_dec_to_input"),
                         [("topk", True), ("jumprelu", False), ("standard", True)])
def test_whitening_folded_as_sae_lens_does(tmp_path: Path, architecture: str,
                                           apply_b_dec_to_input: bool) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    folder = write_saelens_fixture(tmp_path / "sae", layer=1, architecture=architecture,
                                   apply_b_dec_to_input=apply_b_dec_to_input,
                                   normalize_activations="covariance_whitening",
                                   rescale_acts_by_decoder_norm=architecture == "topk")
    whitening = _scaler(folder, whiten=True).whitening
    out = import_saelens([folder], tmp_path / "dict", model=MODEL)
    x = activations()
    with torch.no_grad():
        sae = sae_lens.SAE.load_from_disk(str(folder))
        sae.fold_activation_whitening(whitening.mean, whitening.matrix, whitening.inverse_matrix)
        expected = sae.encode(x)
    assert (expected > 0).any()
    _assert_close(_codes(out, 1, x), expected)


def test_norm_scaling_factor_reference_formula(tmp_path: Path) -> None:
    """Without SAELens: a folded factor f makes raw x encode like the unfolded SAE on x · f."""
    folder = write_saelens_fixture(tmp_path / "sae", layer=1, architecture="jumprelu",
                                   normalize_activations="expected_average_only_in")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    out = import_saelens([folder], tmp_path / "dict", model=MODEL)
    x = activations()
    _assert_close(_codes(out, 1, x), saelens_encode(folder, 2.5 * x))


# ---------------------------------------------------------------------- hooks and layers


@pytest.mark.parametrize(("hook_name", "layer"), [
    ("blocks.2.hook_resid_post", 2), ("blocks.3.hook_resid_pre", 2), ("model.layers.1", 1),
    ("layers.0", 0),
])
def test_hook_names_map_to_block_outputs(tmp_path: Path, hook_name: str, layer: int) -> None:
    folder = write_saelens_fixture(tmp_path / "sae", hook_name=hook_name)
    out = import_saelens([folder], tmp_path / "dict", model=MODEL)
    manifest = load_artifact(out)[1]
    assert manifest.layers == (layer,)
    assert manifest.training["hooks"] == {str(layer): hook_name}
    # how SAELens read text is not known: first-position rule only, no norm rule
    assert manifest.context == TrainingContext.unknown("imported")


@pytest.mark.parametrize("hook_name", [
    "blocks.0.hook_resid_pre", "blocks.2.hook_resid_mid", "blocks.2.hook_mlp_out",
    "blocks.2.attn.hook_z", "blocks.2.hook_attn_out", "hook_embed", "model.layers.2.mlp",
])
def test_other_hook_points_refused(tmp_path: Path, hook_name: str) -> None:
    folder = write_saelens_fixture(tmp_path / "sae", hook_name=hook_name)
    with pytest.raises(ArtifactError) as info:
        import_saelens([folder], tmp_path / "dict", model=MODEL)
    message = str(info.value)
    assert hook_name in message and "hook_resid_post" in message and "allowed" in message
    assert str(folder / "cfg.json") in message
    assert not (tmp_path / "dict").exists()


def test_v5_hook_layer_must_agree_with_hook_name(tmp_path: Path) -> None:
    folder = write_saelens_fixture(tmp_path / "sae", hook_name="blocks.3.hook_resid_pre",
                                   version=5)  # hook_layer 3, block output 2
    assert load_artifact(import_saelens([folder], tmp_path / "d", model=MODEL))[1].layers == (2,)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"hook_layer": 1}))
    with pytest.raises(ArtifactError, match="hook_layer=1"):
        import_saelens([folder], tmp_path / "d2", model=MODEL)


def test_several_saes_make_one_sorted_dictionary(tmp_path: Path) -> None:
    folders = [write_saelens_fixture(tmp_path / "src" / f"sae{i}", layer=layer, seed=i,
                                     architecture=architecture)
               for i, (layer, architecture) in enumerate([(3, "topk"), (0, "jumprelu"),
                                                          (2, "standard")])]
    out = import_dictionary("saelens", [tmp_path / "src"], tmp_path / "dict", model=MODEL)
    resae, manifest = load_artifact(out)
    assert manifest.layers == (0, 2, 3) and manifest.mode == "layerwise"
    assert manifest.scales == (1.0, 1.0, 1.0)
    assert manifest.training["imported_from"] == "saelens"
    x = activations()
    with torch.no_grad():
        codes = resae.encode_dense({layer: x for layer in (0, 2, 3)})
    for folder, layer in zip(folders, (3, 0, 2), strict=True):
        _assert_close(codes[layer], saelens_encode(folder, x))


def test_duplicate_layer_and_width_refused(tmp_path: Path) -> None:
    a = write_saelens_fixture(tmp_path / "a", hook_name="blocks.1.hook_resid_post")
    b = write_saelens_fixture(tmp_path / "b", hook_name="blocks.2.hook_resid_pre")
    with pytest.raises(ArtifactError, match="layer 1 already comes from") as info:
        import_saelens([a, b], tmp_path / "dict", model=MODEL)
    assert str(b / "cfg.json") in str(info.value)
    wide = write_saelens_fixture(tmp_path / "wide", d_in=2 * D_MODEL, layer=1)
    with pytest.raises(ArtifactError, match=f"d_in={2 * D_MODEL}.*d_model={D_MODEL}"):
        import_saelens([wide], tmp_path / "dict", model=MODEL)
    assert not (tmp_path / "dict").exists()


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("changes", "message"), [
    ({"normalize_activations": "layer_norm"}, "layer_norm.*each token"),
    ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
    ({"normalize_activations": "expected_average_only_in"}, "activation_scaler.json is missing"),
    ({"normalize_activations": "covariance_whitening"}, "activation_whitening.safetensors"),
    ({"reshape_activations": "hook_z"}, "hook_z"),
    ({"metadata": {"hook_name": "blocks.1.hook_resid_post", "hook_head_index": 2}},
     "hook_head_index"),
    ({"metadata": {"hook_name": "blocks.1.hook_resid_post",
                   "model_from_pretrained_kwargs": {"center_writing_weights": True}}},
     "center_writing_weights"),
    ({"architecture": "gated"}, "gated.*allowed"),
    ({"architecture": "jumprelu_transcoder"}, "jumprelu_transcoder"),
])
def test_unfoldable_options_refused(tmp_path: Path, changes: dict[str, Any],
                                    message: str) -> None:
    folder = write_saelens_fixture(tmp_path / "sae", architecture="standard")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | changes))
    with pytest.raises(ArtifactError, match=message) as info:
        import_saelens([folder], tmp_path / "dict", model=MODEL)
    assert str(folder) in str(info.value)


def test_bad_scaling_factor_refused(tmp_path: Path) -> None:
    folder = write_saelens_fixture(tmp_path / "sae",
                                   normalize_activations="expected_average_only_in")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))
    with pytest.raises(ArtifactError, match="scaling_factor"):
        import_saelens([folder], tmp_path / "dict", model=MODEL)


def test_jumprelu_log_threshold_checkpoint(tmp_path: Path) -> None:
    """JumpReLU training checkpoints store log_threshold (SAELens JumpReLUTrainingSAE)."""
    folder = write_saelens_fixture(tmp_path / "sae", architecture="jumprelu")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    expected = saelens_encode(folder, activations())
    tensors["log_threshold"] = tensors.pop("threshold").log()
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    out = import_saelens([folder], tmp_path / "dict", model=MODEL)
    _assert_close(_codes(out, 1, activations()), expected)


def test_k_option_sets_sparse_codes_of_relu_saes(tmp_path: Path) -> None:
    folder = write_saelens_fixture(tmp_path / "sae", architecture="standard")
    out = import_saelens([folder], tmp_path / "dict", model=MODEL, k=64)
    assert load_artifact(out)[1].sae_configs[0].k == 64
