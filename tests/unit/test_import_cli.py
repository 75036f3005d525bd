"""``resae import`` and ``resae export-saelens`` from the command line, on a tiny saved model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resae_serve.artifact import load_artifact, save_artifact
from resae_serve.cli import main
from resae_serve.fingerprint import model_fingerprint
from resae_serve.importers import model_identity
from resae_serve.resae import ReSAE
from resae_serve.saes import SAEConfig, build_sae
from tests.unit.import_fixtures import (
    ATOL,
    D_MODEL,
    N_LAYERS,
    activations,
    build_imported_dictionary,
    gemmascope_encode,
    saelens_encode,
    save_tiny_model,
    sparsify_encode,
    write_gemmascope_fixture,
    write_saelens_fixture,
    write_sparsify_fixture,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _source_encode(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """SAELens' own encode when installed, else its reference formula."""
    try:
        import sae_lens
    except ImportError:
        return saelens_encode(folder, x)
    with torch.no_grad():
        return sae_lens.SAE.load_from_disk(str(folder)).encode(x).double()


def test_console_script_imports_saelens_for_the_model(tmp_path: Path, model_dir: Path) -> None:
    src = tmp_path / "src"
    a = write_saelens_fixture(src / "a", layer=3, architecture="topk", seed=1)
    b = write_saelens_fixture(src / "b", hook_name="blocks.2.hook_resid_pre",
                              architecture="jumprelu", version=5, apply_b_dec_to_input=False,
                              seed=2)
    out = tmp_path / "dict"
    script = Path(sys.executable).with_name("resae")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([str(script), "import", "saelens", str(a), str(b), "--model",
                           str(model_dir), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "imported 2 saelens SAEs" in done.stdout and "layer   1  jumprelu" in done.stdout
    resae, manifest = load_artifact(out, expect_fingerprint=model_fingerprint(model_dir))
    assert manifest.layers == (1, 3) and manifest.mode == "layerwise"
    assert manifest.model == model_identity(str(model_dir))
    assert (manifest.model.model_type, manifest.model.n_layers, manifest.model.d_model) == (
        "llama", N_LAYERS, D_MODEL)
    x = activations()
    with torch.no_grad():
        codes = resae.encode_dense({1: x, 3: x})
    for folder, layer in ((a, 3), (b, 1)):
        torch.testing.assert_close(codes[layer].double(), _source_encode(folder, x),
                                   atol=ATOL, rtol=0)
    # what `resae serve` checks at start-up: fingerprint, width, layers, every tensor file
    from resae_serve.server.config import ServerConfig, check_dictionary

    assert check_dictionary(ServerConfig(dictionary=out, model=str(model_dir))).layers == (1, 3)


def test_cli_sparsify_and_gemmascope_with_layers(tmp_path: Path, model_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sparse = write_sparsify_fixture(tmp_path / "ckpt" / "layers.0")
    assert main(["import", "sparsify", str(tmp_path / "ckpt"), "--model", str(model_dir),
                 "--out", str(tmp_path / "sp")]) == 0
    npz = tmp_path / "params.npz"
    write_gemmascope_fixture(tmp_path / "gs", layer=0).rename(npz)
    assert main(["import", "gemmascope", str(npz), "--model", str(model_dir), "--layers", "2",
                 "--k", "16", "--out", str(tmp_path / "gs-dict")]) == 0
    assert "k   16" in capsys.readouterr().out
    x = activations()
    for folder, layer, encode, source in ((tmp_path / "sp", 0, sparsify_encode, sparse),
                                          (tmp_path / "gs-dict", 2, gemmascope_encode, npz)):
        resae, manifest = load_artifact(folder, expect_fingerprint=model_fingerprint(model_dir))
        assert manifest.layers == (layer,)
        with torch.no_grad():
            got = resae.encode_dense({layer: x})[layer]
        torch.testing.assert_close(got.double(), encode(source, x), atol=ATOL, rtol=0)


def test_cli_refusal_names_the_hook_and_exits_2(tmp_path: Path, model_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_saelens_fixture(tmp_path / "mlp", hook_name="blocks.1.hook_mlp_out")
    assert main(["import", "saelens", str(folder), "--model", str(model_dir), "--out",
                 str(tmp_path / "dict")]) == 2
    err = capsys.readouterr().err
    assert "resae import: error:" in err and "blocks.1.hook_mlp_out" in err
    assert "blocks.<L>.hook_resid_post" in err
    assert not (tmp_path / "dict").exists()
    with pytest.raises(SystemExit):
        main(["import", "saelens", str(folder), "--model", str(model_dir), "--out",
              str(tmp_path / "dict"), "--layers", "1,x"])


def test_export_saelens_command_round_trips(tmp_path: Path, model_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    saes = [build_sae(SAEConfig(architecture=a, d_in=D_MODEL, d_sae=96, k=6))
            for a in ("topk", "relu")]
    with torch.no_grad():
        for sae in saes:
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.3)
    dictionary = save_artifact(ReSAE((0, 2), saes, [3.0, 0.5], mode="layerwise"),
                               tmp_path / "dict", model_identity(str(model_dir)))
    assert main(["export-saelens", str(dictionary), "--out", str(tmp_path / "out"),
                 "--hook-template", "model.layers.{layer}"]) == 0
    assert "exported 2 SAELens SAEs" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "layer_2" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "model.layers.2"
    resae, _ = load_artifact(dictionary)
    x = activations()
    with torch.no_grad():
        ours = resae.encode_dense({0: x, 2: x})
    for layer in (0, 2):  # SAELens reads raw block outputs: the scales are folded in
        theirs = _source_encode(tmp_path / "out" / f"layer_{layer}", x)
        torch.testing.assert_close(theirs, ours[layer].double(), atol=ATOL, rtol=0)
    assert main(["import", "saelens", str(tmp_path / "out"), "--model", str(model_dir),
                 "--out", str(tmp_path / "again")]) == 0
    again, _ = load_artifact(tmp_path / "again")
    with torch.no_grad():
        for layer, codes in again.encode_dense({0: x, 2: x}).items():
            torch.testing.assert_close(codes, ours[layer], atol=ATOL, rtol=0)


@pytest.mark.parametrize("source", ["saelens", "sparsify", "gemmascope"])
def test_build_imported_dictionary_helper(tmp_path: Path, model_dir: Path, source: str) -> None:
    out = build_imported_dictionary(model_dir, tmp_path / "dict", source=source, layers=(3, 1))
    _, manifest = load_artifact(out, expect_fingerprint=model_fingerprint(model_dir))
    assert manifest.layers == (1, 3) and manifest.training["imported_from"] == source
