"""Server configuration, request conversion and the committed generated gRPC code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from resae_serve.server.codegen import PACKAGE_DIR, generate
from resae_serve.server.config import (
    Limits,
    ServerConfig,
    ServerConfigError,
    config_from_mapping,
    load_config_file,
    with_model_defaults,
    with_overrides,
)
from resae_serve.server.convert import RequestError, interventions, monitor_spec
from resae_serve.server.v1 import resae_pb2 as pb


def test_generated_code_is_current(tmp_path: Path) -> None:
    """``server/v1`` must be what ``python -m resae_serve.server.codegen`` writes today."""
    for fresh in generate(tmp_path):
        committed = PACKAGE_DIR / fresh.name
        assert committed.is_file(), f"{committed} missing: run python -m resae_serve.server.codegen"
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run python -m resae_serve.server.codegen and commit")


def test_config_from_toml_and_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('dictionary = "runs/x"\nport = 6000\n[limits]\nmax_tokens = 100\n'
                    '[engine]\nmax_num_seqs = 4\n')
    config = config_from_mapping(load_config_file(path), str(path))
    assert config.dictionary == Path("runs/x") and config.port == 6000
    assert config.limits.max_tokens == 100 and config.engine.max_num_seqs == 4
    config = with_overrides(config, port=7000, limits_max_edits=3, engine_max_configs=5,
                            host=None)
    assert (config.port, config.limits.max_edits, config.engine.max_configs) == (7000, 3, 5)
    assert config.limits.max_tokens == 100 and config.host == "127.0.0.1"


@pytest.mark.parametrize(("data", "message"), [
    ({}, "field 'dictionary' is required"),
    ({"dictionary": "d", "prot": 1}, "unknown field(s) ['prot']"),
    ({"dictionary": "d", "limits": {"max_tokenz": 1}}, "[limits]: unknown field(s)"),
    ({"dictionary": "d", "limits": {"max_tokens": 0}}, "limits.max_tokens=0"),
    ({"dictionary": "d", "port": 70000}, "port=70000; allowed 0..65535"),
    ({"dictionary": "d", "tls_cert_file": "c"}, "tls_cert_file and tls_key_file go together"),
    ({"dictionary": "d", "tls_client_ca_file": "ca"}, "tls_client_ca_file needs"),
    ({"dictionary": "d", "engine": {"kv_cache_gib": 1.5}}, "engine.kv_cache_gib=1.5"),
    ({"dictionary": "d", "engine": {"max_num_seqs": 0}}, "engine.max_num_seqs=0"),
    ({"dictionary": "d", "engine": {"op_mode": "full"}},
     "engine.op_mode='full'; allowed: graph, split"),
])
def test_bad_config_names_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ServerConfigError) as info:
        config_from_mapping(data)
    assert message in str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError, match="not found"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ServerConfigError, match="JSON object"):
        load_config_file(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1")
    with pytest.raises(ServerConfigError, match="not valid TOML"):
        load_config_file(broken)


def test_intervention_conversion() -> None:
    limits = Limits(max_edits=2)
    edit = pb.Intervention(layer=6, phase=pb.PHASE_GENERATION, feature=pb.FeatureEdit(
        feature=3, mode=pb.EDIT_MODE_CLAMP, value=2.5))
    vec = pb.Intervention(layer=12, vector=pb.SteeringVector(values=[0.5, -1.0]))
    out = interventions([edit, vec], limits)
    assert (out[0].layer, out[0].feature, out[0].mode, out[0].value, out[0].phase) == (  # type: ignore[union-attr]
        6, 3, "clamp", 2.5, "generation")
    assert out[1].vector == (0.5, -1.0) and out[1].phase == "all"
    assert interventions([edit], limits, phase="all")[0].phase == "all"
    with pytest.raises(RequestError, match="at most 2"):
        interventions([edit] * 3, limits)
    nan = pb.Intervention(layer=6, vector=pb.SteeringVector(values=[0.0, math.nan]))
    with pytest.raises(RequestError, match=r"interventions\[0\].vector.values\[1\]=nan"):
        interventions([nan], limits)


def test_monitor_conversion() -> None:
    limits = Limits(max_top_k=4, max_watch=2)
    spec = monitor_spec(pb.MonitorRequest(layers=[6], top_k=2, watch=[1], thresholds=[
        pb.Threshold(layer=6, feature=1, value=0.5)]), limits)
    assert (spec.layers, spec.top_k, spec.watch, spec.thresholds[0].value) == ((6,), 2, (1,), 0.5)
    for request, message in [
        (pb.MonitorRequest(layers=[6, 6], top_k=1), "repeats a layer"),
        (pb.MonitorRequest(layers=[6], top_k=5), "monitor.top_k=5; allowed 0..4"),
        (pb.MonitorRequest(layers=[6], watch=[1, 2, 3]), "max_watch"),
        (pb.MonitorRequest(layers=[6], thresholds=[pb.Threshold(layer=6, value=math.inf)]),
         r"monitor.thresholds\[0\].value=inf"),
    ]:
        with pytest.raises(RequestError, match=message):
            monitor_spec(request, limits)
    with pytest.raises(RequestError, match=r"monitor\.layers is empty"):
        monitor_spec(pb.MonitorRequest(), limits, require_layers=True)


def test_server_config_defaults_are_valid() -> None:
    config = ServerConfig(dictionary=Path("d"))
    assert not config.tls and config.limits.default_max_tokens <= config.limits.max_tokens


def test_max_model_len_defaults_to_the_models_own_limit(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    config = ServerConfig(dictionary="d", model=str(folder))
    assert config.engine.max_model_len is None
    assert with_model_defaults(config).engine.max_model_len == 512
    explicit = config_from_mapping({"dictionary": "d", "model": str(folder),
                                    "engine": {"max_model_len": 256}})
    assert with_model_defaults(explicit).engine.max_model_len == 256
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ServerConfigError, match=r"declares no context limit.*--max-model-len"):
        with_model_defaults(config)
