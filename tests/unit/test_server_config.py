"""Server configuration, request conversion and the committed generated gRPC code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from resae_serve.context import OutOfDistribution
from resae_serve.engine.memory import GIB, RUNTIME_BYTES, default_kv_cache_bytes
from resae_serve.engine.serving import TokenFeatures
from resae_serve.server.codegen import PACKAGE_DIR, generate
from resae_serve.server.config import (
    KV_ENV,
    Limits,
    ServerConfig,
    ServerConfigError,
    check_memory,
    config_from_mapping,
    load_config_file,
    memory_plan,
    with_model_defaults,
    with_overrides,
)
from resae_serve.server.convert import (
    RequestError,
    feature_messages,
    features_json,
    interventions,
    monitor_spec,
)
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
    ({"dictionary": "d", "http_port": -2}, "http_port=-2; allowed 0..65535"),
    ({"dictionary": "d", "tls_cert_file": "c"}, "tls_cert_file and tls_key_file go together"),
    ({"dictionary": "d", "tls_client_ca_file": "ca"}, "tls_client_ca_file needs"),
    ({"dictionary": "d", "engine": {"kv_cache_gib": 0}}, "engine.kv_cache_gib=0"),
    ({"dictionary": "d", "restart_attempts": 0}, "restart_attempts=0"),
    ({"dictionary": "d", "restart_backoff_s": -1}, "restart_backoff_s=-1"),
    ({"dictionary": "d", "restart_engine": "no"}, "restart_engine='no'"),
    ({"dictionary": "d", "engine": {"max_num_seqs": 0}}, "engine.max_num_seqs=0"),
    ({"dictionary": "d", "engine": {"op_mode": "full"}},
     "engine.op_mode='full'; allowed: graph, split"),
    ({"dictionary": "d", "engine": {"runtime": "onnx"}},
     "engine.runtime='onnx' (--runtime); allowed: auto, torch, onnxruntime, tensorrt"),
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
    assert not spec.include_out_of_distribution               # events skip them by default
    assert monitor_spec(pb.MonitorRequest(layers=[6], top_k=1, include_out_of_distribution=True),
                        limits).include_out_of_distribution
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


def test_features_say_why_a_position_is_out_of_distribution() -> None:
    features = [TokenFeatures(0, 6, (1,), (2.0,), (), (), int(OutOfDistribution.FIRST_POSITION)),
                TokenFeatures(1, 6, (1,), (0.5,), ()),
                TokenFeatures(2, 6, (1,), (9.0,), (), (), int(OutOfDistribution.NORM_OUTLIER))]
    messages = feature_messages(features)
    assert [(m.out_of_distribution, m.out_of_distribution_reason) for m in messages] == [
        (True, pb.OUT_OF_DISTRIBUTION_FIRST_POSITION), (False, 0),
        (True, pb.OUT_OF_DISTRIBUTION_NORM_OUTLIER)]
    for reason in OutOfDistribution:       # one numbering in the library and the API
        assert pb.OutOfDistribution.Name(int(reason)).endswith(
            "UNSPECIFIED" if reason == OutOfDistribution.NONE else reason.name)
    body = features_json(features, [])     # the HTTP API's JSON mapping
    assert body["features"][0]["outOfDistributionReason"] == "OUT_OF_DISTRIBUTION_FIRST_POSITION"
    assert body["features"][1]["outOfDistribution"] is False


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


# ----------------------------------------------------------------------------- memory

@pytest.fixture
def sized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ServerConfig:
    """A tiny Llama folder (weights saved) and a tiny dictionary; no KV size in the env."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from resae_serve.artifact import save_artifact
    from tests.unit.resae_fixtures import IDENTITY, tiny_resae

    monkeypatch.delenv(KV_ENV, raising=False)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=8, intermediate_size=16,
                                 num_hidden_layers=4, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=512)
                     ).save_pretrained(tmp_path / "model")
    dictionary = save_artifact(tiny_resae(), tmp_path / "dict", IDENTITY)
    return ServerConfig(dictionary=dictionary, model=str(tmp_path / "model"))


def test_the_default_kv_cache_follows_the_configuration(
        sized: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    per_token = 2 * 4 * 1 * 4 * 4                       # layers, KV heads, head_dim, float32
    plan = memory_plan(sized, gpu=False)                # 16 × the model's own 512 tokens
    assert plan.kv_cache == default_kv_cache_bytes(per_token, 16, 512)
    wider = with_overrides(sized, engine_max_num_seqs=64, engine_max_model_len=128)
    assert memory_plan(wider, gpu=False).kv_cache == default_kv_cache_bytes(per_token, 64, 128)
    monkeypatch.setenv(KV_ENV, "3")                     # vLLM's variable, whole GiB
    assert memory_plan(sized, gpu=False).kv_cache == 3 * GIB
    explicit = with_overrides(sized, engine_kv_cache_gib=0.5)  # the setting wins over both
    assert memory_plan(explicit, gpu=False)[1:3] == (GIB // 2, "engine.kv_cache_gib")
    assert memory_plan(sized, gpu=True).kv_cache is None   # GPU: gpu_memory_utilization
    monkeypatch.setenv(KV_ENV, "two")
    with pytest.raises(ServerConfigError, match="VLLM_CPU_KVCACHE_SPACE='two'"):
        memory_plan(sized, gpu=False)


def test_the_memory_check_refuses_what_does_not_fit(sized: ServerConfig) -> None:
    plan = check_memory(sized, available=64 * GIB, gpu=False)
    assert plan.total > RUNTIME_BYTES
    too_many = with_overrides(sized, engine_max_num_seqs=10**6)
    with pytest.raises(ServerConfigError) as info:
        check_memory(too_many, available=8 * GIB, gpu=False)
    message = str(info.value)
    need = memory_plan(too_many, gpu=False).total
    assert f"needs about {need / GIB:.2f} GiB" in message and "8.00 GiB is available" in message
    assert "max_num_seqs 1000000 × max_model_len 512" in message
    assert "lower --max-num-seqs or --max-model-len" in message
    with pytest.raises(ServerConfigError, match=r"lower --kv-cache-gib"):
        check_memory(with_overrides(sized, engine_kv_cache_gib=100), available=8 * GIB,
                     gpu=False)
    # a KV cache smaller than one full-length sequence: vLLM would refuse it after loading
    with pytest.raises(ServerConfigError, match=r"holds \d+ tokens, fewer than one sequence of "
                       r"engine.max_model_len=512; raise --kv-cache-gib to at least"):
        check_memory(with_overrides(sized, engine_kv_cache_gib=1e-5), available=8 * GIB,
                     gpu=False)
    # on GPU vLLM checks GPU memory itself
    assert check_memory(too_many, available=8 * GIB, gpu=True).kv_cache is None


def test_serve_flags_for_memory_and_restarts() -> None:
    import argparse

    from resae_serve.cli.serve import add_parser, build_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    config = build_config(parser.parse_args(["serve", "d", "--kv-cache-gib", "1.5"]))
    assert config.engine.kv_cache_gib == 1.5 and config.restart_engine
    assert (config.restart_attempts, config.restart_backoff_s) == (5, 2.0)
    config = build_config(parser.parse_args([
        "serve", "d", "--no-restart-engine", "--restart-attempts", "2", "--restart-backoff",
        "0.5", "--gpu-memory-utilization", "0.5"]))
    assert not config.restart_engine and config.restart_attempts == 2
    assert config.restart_backoff_s == 0.5 and config.engine.gpu_memory_utilization == 0.5


def test_serve_flag_for_the_http_api() -> None:
    import argparse

    from resae_serve.cli.serve import add_parser, build_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert build_config(parser.parse_args(["serve", "d"])).http_port is None     # off
    config = build_config(parser.parse_args(["serve", "d", "--http-port", "8000",
                                             "--metrics-port", "-1"]))
    assert (config.http_port, config.metrics_port) == (8000, None)
    assert build_config(parser.parse_args(["serve", "d", "--http-port", "-1"])).http_port is None


def test_serve_flag_and_config_key_for_the_feature_runtime(tmp_path: Path) -> None:
    import argparse

    from resae_serve.cli.serve import add_parser, build_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert build_config(parser.parse_args(["serve", "d"])).engine.runtime == "auto"
    assert build_config(parser.parse_args(["serve", "d", "--runtime", "torch"])
                        ).engine.runtime == "torch"
    path = tmp_path / "serve.toml"
    path.write_text('dictionary = "d"\nexport = "d.onnx"\n[engine]\nruntime = "onnxruntime"\n')
    config = build_config(parser.parse_args(["serve", "--config", str(path)]))
    assert config.engine.runtime == "onnxruntime" and config.export == Path("d.onnx")
    with pytest.raises(SystemExit):                      # argparse names the choices
        parser.parse_args(["serve", "d", "--runtime", "tvm"])
