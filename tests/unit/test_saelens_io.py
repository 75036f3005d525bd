"""SAELens export/import: file layout, parity with a plain-torch SAELens forward, round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from resae_serve.artifact import ArtifactError, ModelIdentity, load_artifact, save_artifact
from resae_serve.resae import ReSAE
from resae_serve.saelens_io import (
    SAELENS_CFG_FILE,
    SAELENS_WEIGHTS_FILE,
    export_saelens,
    import_saelens,
)
from resae_serve.saes import SAE, SAEConfig, build_sae

D_IN, D_SAE, K = 16, 64, 4
LAYERS, SCALES = (1, 2), (2.5, 0.7)
MODEL = ModelIdentity(name="tiny", fingerprint="sha256:x", model_type="llama", n_layers=4,
                      d_model=D_IN)
ATOL = 1e-5


def _sae(architecture: str, seed: int) -> SAE:
    """A tiny SAE with non-trivial biases, encoder and (for BatchTopK) per-latent thresholds."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K))  # type: ignore[arg-type]
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE))
        sae.b_dec.copy_(0.5 * torch.randn(D_IN))
        if architecture == "batchtopk":
            sae.get_buffer("threshold").copy_(0.4 * torch.rand(D_SAE))
    return sae


def _dictionary(tmp_path: Path, architecture: str, mode: str = "layerwise") -> Path:
    saes = [_sae(architecture, seed) for seed in range(len(LAYERS))]
    affine = None
    if mode == "resae":
        affine = [None, (0.1 * torch.randn(D_IN, D_IN), torch.randn(D_IN))]
    resae = ReSAE(LAYERS, saes, SCALES, mode=mode, affine=affine)  # type: ignore[arg-type]
    return save_artifact(resae, tmp_path / f"dict_{architecture}_{mode}", MODEL)


def _acts(n: int = 96) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {layer: scale * torch.randn(n, D_IN, generator=g) + 0.2
            for layer, scale in zip(LAYERS, SCALES, strict=True)}


def _saelens_forward(folder: Path, h: torch.Tensor) -> torch.Tensor:
    """SAELens' inference forward (6.x StandardSAE / TopKSAE / JumpReLUSAE, 5.x flat TopK)."""
    cfg: dict[str, Any] = json.loads((folder / SAELENS_CFG_FILE).read_text())
    w = load_file(str(folder / SAELENS_WEIGHTS_FILE))
    sae_in = h - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    architecture = cfg["architecture"]
    if architecture == "standard" and cfg.get("activation_fn_str") == "topk":
        architecture, cfg["k"] = "topk", cfg["activation_fn_kwargs"]["k"]
    norms = w["W_dec"].norm(dim=-1)
    if architecture == "topk":
        rescale = cfg.get("rescale_acts_by_decoder_norm", False)
        pre = pre * norms if rescale else pre
        values, indices = pre.topk(cfg["k"], dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        z = z / norms if rescale else z
    elif architecture == "jumprelu":
        z = pre.relu() * (pre > w["threshold"].relu())
    else:
        assert architecture == "standard"
        z = pre.relu()
    return z @ w["W_dec"] + w["b_dec"]


def _reconstruction(folder: Path, acts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``ReSAE.forward`` of a dictionary folder (dense codes: every active latent kept)."""
    resae, _ = load_artifact(folder)
    with torch.no_grad():
        return resae(acts)


# ---------------------------------------------------------------------- export


def test_export_writes_one_saelens_folder_per_layer(tmp_path: Path) -> None:
    folders = export_saelens(_dictionary(tmp_path, "topk"), tmp_path / "out")
    assert folders == [tmp_path / "out" / f"layer_{layer}" for layer in LAYERS]
    for layer, folder in zip(LAYERS, folders, strict=True):
        cfg = json.loads((folder / SAELENS_CFG_FILE).read_text())
        assert cfg["architecture"] == "topk" and cfg["k"] == K
        assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
        assert cfg["apply_b_dec_to_input"] is True
        assert cfg["normalize_activations"] == cfg["reshape_activations"] == "none"
        assert cfg["rescale_acts_by_decoder_norm"] is False
        meta = cfg["metadata"]
        assert meta["hook_name"] == f"blocks.{layer}.hook_resid_post"
        assert meta["model_name"] == "tiny"
        assert int(meta["sae_lens_version"].split(".")[0]) >= 6
        tensors = load_file(str(folder / SAELENS_WEIGHTS_FILE))
        assert {k: list(v.shape) for k, v in tensors.items()} == {
            "W_enc": [D_IN, D_SAE], "b_enc": [D_SAE], "W_dec": [D_SAE, D_IN], "b_dec": [D_IN]}


def test_export_hook_template(tmp_path: Path) -> None:
    folders = export_saelens(_dictionary(tmp_path, "relu"), tmp_path / "out",
                             hook_template="model.layers.{layer}")
    cfg = json.loads((folders[0] / SAELENS_CFG_FILE).read_text())
    assert cfg["architecture"] == "standard"
    assert cfg["metadata"]["hook_name"] == "model.layers.1"
    with pytest.raises(ArtifactError, match="layer"):
        export_saelens(_dictionary(tmp_path, "relu"), tmp_path / "x", hook_template="blocks")


@pytest.mark.parametrize(("architecture", "saelens_name"),
                         [("topk", "topk"), ("batchtopk", "jumprelu"), ("relu", "standard")])
def test_export_matches_saelens_forward_on_raw_activations(
    tmp_path: Path, architecture: str, saelens_name: str
) -> None:
    dictionary = _dictionary(tmp_path, architecture)
    folders = export_saelens(dictionary, tmp_path / "out")
    acts = _acts()
    expected = _reconstruction(dictionary, acts)
    for layer, folder in zip(LAYERS, folders, strict=True):
        assert json.loads((folder / SAELENS_CFG_FILE).read_text())["architecture"] == saelens_name
        got = _saelens_forward(folder, acts[layer])
        torch.testing.assert_close(got, expected[layer], atol=ATOL, rtol=0)


def test_export_refuses_resae_mode(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="layerwise"):
        export_saelens(_dictionary(tmp_path, "topk", mode="resae"), tmp_path / "out")


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu"])
def test_import_of_export_reproduces_the_dictionary(tmp_path: Path, architecture: str) -> None:
    dictionary = _dictionary(tmp_path, architecture)
    folders = export_saelens(dictionary, tmp_path / "out")
    imported = import_saelens(folders[::-1], tmp_path / "imported", model=MODEL)
    original, _ = load_artifact(dictionary)
    again, manifest = load_artifact(imported, expect_fingerprint=MODEL.fingerprint)
    assert manifest.mode == "layerwise" and manifest.layers == LAYERS
    assert manifest.scales == (1.0, 1.0)
    assert [c.k for c in manifest.sae_configs] == [K, K]  # recorded k survives for every kind
    acts = _acts()
    with torch.no_grad():  # forward (dense codes) and the top-k sparse path serving uses
        for ours, theirs in ((original(acts), again(acts)),
                             (original.decode(original.encode(acts)),
                              again.decode(again.encode(acts)))):
            for layer in LAYERS:
                torch.testing.assert_close(theirs[layer], ours[layer], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- import errors


def _exported(tmp_path: Path, architecture: str = "topk") -> Path:
    return export_saelens(_dictionary(tmp_path, architecture), tmp_path / "out")[0]


def _edit_cfg(folder: Path, **changes: Any) -> Path:
    path = folder / SAELENS_CFG_FILE
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        target = cfg["metadata"] if key == "hook_name" else cfg
        target[key] = value
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"hook_name": "blocks.0.hook_resid_pre"}, "blocks.0.hook_resid_pre"),  # the embeddings
    ({"hook_name": "blocks.1.hook_resid_mid"}, "blocks.1.hook_resid_mid"),
    ({"hook_name": "blocks.1.attn.hook_z"}, "hook_z"),
    ({"architecture": "gated"}, "gated"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations"),
    ({"k": 0}, "k"),
])
def test_import_refuses_bad_cfg_naming_the_file(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = _edit_cfg(_exported(tmp_path), **changes)
    with pytest.raises(ArtifactError, match=message) as info:
        import_saelens([path.parent], tmp_path / "imported", model=MODEL)
    assert str(path) in str(info.value)
    assert not (tmp_path / "imported").exists()


def test_import_refuses_d_in_mismatch(tmp_path: Path) -> None:
    folder = _exported(tmp_path)
    wide = ModelIdentity(name="wide", fingerprint="sha256:y", model_type="llama", n_layers=4,
                         d_model=32)
    with pytest.raises(ArtifactError, match="d_in=16") as info:
        import_saelens([folder], tmp_path / "imported", model=wide)
    assert str(folder / SAELENS_CFG_FILE) in str(info.value)


@pytest.mark.parametrize("name", [SAELENS_CFG_FILE, SAELENS_WEIGHTS_FILE])
def test_import_refuses_missing_file(tmp_path: Path, name: str) -> None:
    folder = _exported(tmp_path)
    (folder / name).unlink()
    with pytest.raises(ArtifactError, match="missing") as info:
        import_saelens([folder], tmp_path / "imported", model=MODEL)
    assert str(folder / name) in str(info.value)


def test_import_refuses_missing_tensor_naming_the_file(tmp_path: Path) -> None:
    folder = _exported(tmp_path, "batchtopk")
    tensors = load_file(str(folder / SAELENS_WEIGHTS_FILE))
    del tensors["threshold"]
    save_file(tensors, str(folder / SAELENS_WEIGHTS_FILE))
    with pytest.raises(ArtifactError, match="threshold") as info:
        import_saelens([folder], tmp_path / "imported", model=MODEL)
    assert str(folder / SAELENS_WEIGHTS_FILE) in str(info.value)


def test_import_layers_argument(tmp_path: Path) -> None:
    folder = _exported(tmp_path)  # layer 1
    with pytest.raises(ArtifactError, match="ambiguous"):
        import_saelens([folder], tmp_path / "imported", model=MODEL, layers=[3])
    with pytest.raises(ArtifactError, match="one layer per SAE"):
        import_saelens([folder], tmp_path / "imported", model=MODEL, layers=[1, 2])
    cfg = json.loads((folder / SAELENS_CFG_FILE).read_text())
    del cfg["metadata"]["hook_name"]
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="which layer"):
        import_saelens([folder], tmp_path / "imported", model=MODEL)
    import_saelens([folder], tmp_path / "imported", model=MODEL, layers=[3])
    assert load_artifact(tmp_path / "imported")[1].layers == (3,)


# ---------------------------------------------------------------------- other SAELens layouts


def _write_saelens(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / SAELENS_CFG_FILE).write_text(json.dumps(cfg))
    save_file(tensors, str(folder / SAELENS_WEIGHTS_FILE))
    return folder


def _random_weights(seed: int, threshold: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": 0.3 * torch.randn(D_IN, D_SAE, generator=g),
               "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
               "W_dec": 0.5 * torch.randn(D_SAE, D_IN, generator=g),  # rows not unit norm
               "b_dec": 0.2 * torch.randn(D_IN, generator=g)}
    if threshold:
        tensors["threshold"] = 0.3 * torch.rand(D_SAE, generator=g)
    return tensors


def _assert_imported_matches(tmp_path: Path, folder: Path, layer: int) -> None:
    out = import_saelens([folder], tmp_path / "imported", model=MODEL)
    acts = _acts()
    h = acts[LAYERS[0]]
    torch.testing.assert_close(_reconstruction(out, {layer: h})[layer],
                               _saelens_forward(folder, h), atol=ATOL, rtol=0)


def test_import_v5_flat_topk_cfg(tmp_path: Path) -> None:
    cfg = {  # SAELens 5.x: metadata at the top level, TopK as an activation of "standard"
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
        "device": "cpu", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
        "model_name": "tiny", "hook_name": "blocks.2.hook_resid_post", "hook_layer": 2,
        "hook_head_index": None, "normalize_activations": "none", "context_size": 128,
        "prepend_bos": True, "sae_lens_training_version": "5.9.1",
    }
    folder = _write_saelens(tmp_path / "v5", cfg, _random_weights(1))
    _assert_imported_matches(tmp_path, folder, layer=2)
    manifest = load_artifact(tmp_path / "imported")[1]
    assert manifest.sae_configs[0].architecture == "topk" and manifest.sae_configs[0].k == K


def test_import_v5_jumprelu_without_b_dec_on_input(tmp_path: Path) -> None:
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "activation_fn_str": "relu", "apply_b_dec_to_input": False,
           "hook_point": "blocks.3.hook_resid_post", "normalize_activations": None}
    folder = _write_saelens(tmp_path / "v5j", cfg, _random_weights(2, threshold=True))
    _assert_imported_matches(tmp_path, folder, layer=3)


def test_import_v6_topk_rescaled_by_decoder_norm(tmp_path: Path) -> None:
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "k": K, "rescale_acts_by_decoder_norm": True,
           "metadata": {"sae_lens_version": "6.12.1", "hook_name": "blocks.0.hook_resid_post"}}
    folder = _write_saelens(tmp_path / "v6", cfg, _random_weights(3))
    _assert_imported_matches(tmp_path, folder, layer=0)
