"""Splicing metrics on tiny models, against hand-computed or independently computed values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from resae_serve.capture import LayerCapture
from resae_serve.evaluation.hooks import added_at, constant_at, forward_logits, hooked, recorder
from resae_serve.evaluation.splice import error_preserving_hooks, evaluate_splicing, online_hooks
from resae_serve.interventions import FeatureEdit, edit_table
from tests.unit.test_eval_support import (
    D,
    constant_dictionary,
    perfect_dictionary,
    random_dictionary,
    tiny_windows,
)

LAYERS = (1, 3)


def _means(model: PreTrainedModel, windows: list) -> dict[int, torch.Tensor]:
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    with LayerCapture(model, LAYERS, stop_early=False) as capture:
        for win in windows:
            out = capture.run(win.input_ids, win.attention_mask)
            for layer in LAYERS:
                rows[layer].append(out[layer][win.keep])
    return {layer: torch.cat(r).mean(0) for layer, r in rows.items()}


def test_perfect_reconstruction_changes_nothing(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Every family (tensor- and tuple-returning blocks): ΔCE 0, KL 0, CE recovered 1."""
    windows = tiny_windows(tiny_tokenizer)
    means = _means(tiny_model, windows)
    dicts = {"resae": perfect_dictionary(LAYERS, "resae"),
             "layerwise": perfect_dictionary(LAYERS, "layerwise")}
    reports = evaluate_splicing(tiny_model, windows, dicts, means, progress=False)
    for report in reports.values():
        assert report.n_tokens == sum(int((w.keep[:, :-1] & w.attention_mask[:, 1:].bool())
                                          .sum()) for w in windows)
        results = [*report.single.values(), *report.local.values(), *report.joint.values()]
        assert len(results) == 2 + 3 + len(report.local)
        for r in results:
            assert r.delta_ce == pytest.approx(0, abs=1e-4)
            assert r.kl == pytest.approx(0, abs=1e-5)
            assert r.ce_recovered == pytest.approx(1, abs=1e-3)
        for value in report.interaction.values():
            assert value == pytest.approx(0, abs=1e-4)


def test_mean_reconstruction_is_the_ablation_baseline(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    windows = tiny_windows(tiny_tokenizer)
    means = _means(tiny_llama, windows)
    dicts = {"resae": constant_dictionary(means, "resae"),
             "layerwise": constant_dictionary(means, "layerwise")}
    for report in evaluate_splicing(tiny_llama, windows, dicts, means, progress=False).values():
        # (additive mode is not a replacement: it adds mean − h_clean to a perturbed stream)
        replaced = [r for mode, r in report.joint.items() if mode != "teacher_forced_additive"]
        for r in [*report.single.values(), *replaced]:
            assert r.ce == pytest.approx(r.ce_ablate, abs=1e-5)
            assert r.ce_recovered == pytest.approx(0, abs=1e-3)
            assert r.kl > 0


def test_last_layer_splice_matches_manual_unembedding(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Splicing the last block equals lm_head(norm(x̂)) computed by hand, BOS left clean."""
    windows = tiny_windows(tiny_tokenizer, n_windows=3, batch_size=3)
    resae = random_dictionary((3,), "layerwise")
    means = _means(tiny_llama, windows)
    means[3] = torch.zeros(D)
    report = evaluate_splicing(tiny_llama, windows, {"d": resae}, means, progress=False)["d"]
    win = windows[0]
    with LayerCapture(tiny_llama, (3,), stop_early=False) as capture:
        h = capture.run(win.input_ids, win.attention_mask)[3]
    spliced = h.clone()
    with torch.no_grad():
        spliced[win.keep] = resae({3: h[win.keep]})[3]
    score = win.keep[:, :-1] & win.attention_mask[:, 1:].bool()
    targets = win.input_ids[:, 1:][score]

    @torch.no_grad()
    def logprobs(hidden: torch.Tensor) -> torch.Tensor:
        logits = tiny_llama.lm_head(tiny_llama.model.norm(hidden))
        return F.log_softmax(logits[:, :-1][score], dim=-1)

    lp_clean, lp = logprobs(h), logprobs(spliced)
    ce_clean = F.nll_loss(lp_clean, targets)
    ce = F.nll_loss(lp, targets)
    kl = F.kl_div(lp, lp_clean, log_target=True, reduction="batchmean")
    assert report.ce_clean == pytest.approx(float(ce_clean), abs=1e-5)
    assert report.single[3].delta_ce == pytest.approx(float(ce - ce_clean), abs=1e-5)
    assert report.single[3].kl == pytest.approx(float(kl), abs=1e-5)
    assert report.joint["online"].ce == pytest.approx(report.single[3].ce, abs=1e-6)


def test_online_joint_matches_a_manual_two_stage_splice(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Online: layer 3's encoder reads the stream changed by layer 1's splice (and x̂_1 as
    h_prev). Rebuilt by hand from the ReSAE API, then spliced as fixed values."""
    win = tiny_windows(tiny_tokenizer, n_windows=2)[0]
    resae = random_dictionary(LAYERS, "resae", seed=2)
    ids, mask, keep = win.input_ids, win.attention_mask, win.keep
    clean: dict[int, torch.Tensor] = {}
    forward_logits(tiny_llama, ids, mask, {1: recorder(clean, 1)})
    z1 = resae.saes[0].encode(resae.sae_input(0, clean[1][keep], None))
    x1 = resae.decode({1: z1, 3: torch.zeros(len(z1), 64)})[1]
    after: dict[int, torch.Tensor] = {}
    forward_logits(tiny_llama, ids, mask, {1: constant_at(keep, x1), 3: recorder(after, 3)})
    z3 = resae.saes[1].encode(resae.sae_input(1, after[3][keep], x1))
    x3 = resae.decode({1: z1, 3: z3})[3]
    manual = forward_logits(tiny_llama, ids, mask, {1: constant_at(keep, x1),
                                                    3: constant_at(keep, x3)})
    online = forward_logits(tiny_llama, ids, mask, online_hooks(resae, keep, LAYERS))
    torch.testing.assert_close(online, manual, atol=1e-5, rtol=1e-5)
    # teacher-forced differs: its layer-3 encoder reads the clean stream
    clean3: dict[int, torch.Tensor] = {}
    forward_logits(tiny_llama, ids, mask, {3: recorder(clean3, 3)})
    tf = resae({1: clean[1][keep], 3: clean3[3][keep]})
    teacher = forward_logits(tiny_llama, ids, mask, {layer: constant_at(keep, tf[layer])
                                                     for layer in LAYERS})
    assert not torch.allclose(teacher, online, atol=1e-4)
    # a single layer online equals its teacher-forced splice (nothing upstream changed)
    single = forward_logits(tiny_llama, ids, mask, online_hooks(resae, keep, {3}))
    fixed = forward_logits(tiny_llama, ids, mask, {3: constant_at(keep, tf[3])})
    torch.testing.assert_close(single, fixed, atol=1e-5, rtol=1e-5)


def test_interaction_term_and_recovered_are_consistent(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    windows = tiny_windows(tiny_tokenizer)
    means = _means(tiny_llama, windows)
    report = evaluate_splicing(tiny_llama, windows, {"r": random_dictionary(LAYERS)}, means,
                               progress=False)["r"]
    total = sum(r.delta_ce for r in report.single.values())
    for mode, joint in report.joint.items():
        assert report.interaction[mode] == pytest.approx(joint.delta_ce - total)
        assert joint.delta_ce == pytest.approx(joint.ce - report.ce_clean)
        assert joint.ce_recovered == pytest.approx(
            (joint.ce_ablate - joint.ce) / (joint.ce_ablate - report.ce_clean))
    with pytest.raises(ValueError, match="modes"):
        evaluate_splicing(tiny_llama, windows, {}, means, modes=("sideways",))


def test_error_preserving_splice(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """x̂ + (x − x̂) without edits is the clean model; an add edit moves h by α·s·d exactly."""
    win = tiny_windows(tiny_tokenizer, n_windows=2)[0]
    ids, mask, keep = win.input_ids, win.attention_mask, win.keep
    resae = random_dictionary(LAYERS, "resae", seed=1)
    n = int(keep.sum())
    clean = forward_logits(tiny_llama, ids, mask)
    none = edit_table([], n, d_sae=64)
    same = forward_logits(tiny_llama, ids, mask, error_preserving_hooks(resae, keep, {1: none}))
    torch.testing.assert_close(same, clean, atol=0, rtol=0)
    table = edit_table([FeatureEdit(layer=1, feature=5, mode="add", value=3.0)], n, d_sae=64)
    seen: dict[int, torch.Tensor] = {}
    before: dict[int, torch.Tensor] = {}
    forward_logits(tiny_llama, ids, mask, {1: recorder(before, 1)})
    with hooked(tiny_llama, error_preserving_hooks(resae, keep, {1: table})):
        handle = tiny_llama.model.layers[1].register_forward_hook(
            lambda _m, _a, out: seen.__setitem__(1, out))
        tiny_llama(input_ids=ids, attention_mask=mask)
        handle.remove()
    expected = 3.0 * resae.scales[0] * resae.saes[0].W_dec[5]
    torch.testing.assert_close(seen[1][keep] - before[1][keep], expected.expand(n, D),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[1][~keep], before[1][~keep])


def test_local_splice_and_additive_joint_by_hand(
    tiny_llama: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Local: layer 3 rebuilt as A h_1,clean + c + σ D(z_3), not through x̂_1. Additive: both
    encoders read the clean pass, each layer adds its own (local) error to the stream as it
    arrives, so layer 1's error reaches the output (unlike teacher-forced replacement)."""
    windows = tiny_windows(tiny_tokenizer, n_windows=2, context_size=24)
    win = windows[0]
    resae = random_dictionary(LAYERS, "resae", seed=3)
    ids, mask, keep = win.input_ids, win.attention_mask, win.keep
    clean: dict[int, torch.Tensor] = {}
    clean_logits = forward_logits(tiny_llama, ids, mask, {layer: recorder(clean, layer)
                                                          for layer in LAYERS})
    h1, h3 = clean[1][keep].float(), clean[3][keep].float()
    z1 = resae.saes[0].encode(resae.sae_input(0, h1, None))
    z3 = resae.saes[1].encode(resae.sae_input(1, h3, h1))
    x1 = resae.scales[0] * resae.saes[0].decode(z1)
    local3 = resae.predict(1, h1) + resae.scales[1] * resae.saes[1].decode(z3)
    chained3 = resae.decode({1: z1, 3: z3})[3]
    assert not torch.allclose(local3, chained3, atol=1e-4)   # the chain carries x̂_1's error

    def ce(logits: torch.Tensor) -> float:
        score = keep[:, :-1] & mask[:, 1:].bool()
        lp = F.log_softmax(logits[:, :-1][score].float(), dim=-1)
        return float(-lp.gather(1, ids[:, 1:][score][:, None]).mean())

    report = evaluate_splicing(tiny_llama, [win], {"r": resae}, _means(tiny_llama, [win]),
                               progress=False)["r"]
    assert set(report.local) == {3}
    manual_local = forward_logits(tiny_llama, ids, mask, {3: constant_at(keep, local3)})
    assert report.local[3].ce == pytest.approx(ce(manual_local), abs=1e-5)
    assert report.ce_clean == pytest.approx(ce(clean_logits), abs=1e-6)
    manual_add = forward_logits(tiny_llama, ids, mask, {1: added_at(keep, x1 - h1),
                                                        3: added_at(keep, local3 - h3)})
    additive = report.joint["teacher_forced_additive"]
    assert additive.ce == pytest.approx(ce(manual_add), abs=1e-5)
    # not degenerate: differs from layer 3's local error alone, which teacher-forced is
    alone = forward_logits(tiny_llama, ids, mask, {3: added_at(keep, local3 - h3)})
    assert abs(additive.ce - ce(alone)) > 1e-4
    assert report.joint["teacher_forced"].ce == pytest.approx(report.single[3].ce, abs=1e-6)
    layerwise = evaluate_splicing(tiny_llama, [win], {"l": random_dictionary(LAYERS,
                                  "layerwise", seed=3)}, _means(tiny_llama, [win]),
                                  progress=False)["l"]
    assert layerwise.local == {}
