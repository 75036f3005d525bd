"""The engine's table math against the torch oracle ``ReSAE.intervention_delta`` (no vLLM)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from resae_serve.context import TrainingContext
from resae_serve.engine.gates import NEVER
from resae_serve.engine.spec import (
    Condition,
    MonitorSpec,
    SteerEdit,
    SteeringSpec,
    SteerVector,
)
from resae_serve.engine.tables import SteeringTables, TablesFullError
from resae_serve.export.convert import export_resae
from resae_serve.export.graphs import graph_module, nest_inputs
from resae_serve.export.spec import ExportConfig
from resae_serve.interventions import EditTable, Gate, GatedEdit, InterventionError, edit_table
from resae_serve.resae import ReSAE
from tests.unit.resae_fixtures import D_MODEL, D_SAE, LAYERS, tiny_acts, tiny_resae

ATOL = 1e-5  # float32, same ops in a different order


def _step(tables: SteeringTables, specs: list[SteeringSpec | None], counts: list[int],
          starts: list[int], num_prompt: list[int]) -> None:
    rows = [tables.claim(f"r{j}", spec) for j, spec in enumerate(specs)]
    tables.prepare_step(sum(counts), rows, np.array(counts), np.array(starts),
                        np.array(num_prompt))


def _run_layers(tables: SteeringTables, acts: dict[int, torch.Tensor]
                ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Feed each layer's block output split as hidden + residual; (before, after) per layer."""
    before, after = {}, {}
    for i, layer in enumerate(LAYERS):
        residual = torch.randn_like(acts[layer])
        hidden = acts[layer] - residual
        before[layer] = hidden + residual
        tables.apply(i, hidden, residual)
        after[layer] = hidden + residual
    return before, after


@pytest.mark.parametrize("mode", ["resae", "layerwise"])
def test_apply_matches_intervention_delta(mode: str) -> None:
    resae = tiny_resae(mode)  # type: ignore[arg-type]
    tables = SteeringTables(resae, max_tokens=16, max_rows=9)
    edits = (SteerEdit(LAYERS[0], 3, "add", 2.0), SteerEdit(LAYERS[1], 5, "clamp", 1.5),
             SteerEdit(LAYERS[1], 7, "scale", 3.0), SteerEdit(LAYERS[1], 9, "ablate"),
             SteerEdit(LAYERS[1], 11, "add", -1.0))
    vector = tuple(float(x) for x in torch.linspace(-1, 1, D_MODEL))
    spec = SteeringSpec(edits=edits, vectors=(SteerVector(LAYERS[1], vector),))
    # request 0 unsteered (3 tokens), request 1 steered (3 tokens); no padding
    _step(tables, [None, spec], [3, 3], [0, 0], [3, 3])
    acts = tiny_acts(6)
    clean, got = _run_layers(tables, acts)
    # oracle: layer 0 edits on clean h0; layer 1 reads h_prev = edited h0 (what the stream carried)
    h0 = acts[LAYERS[0]][3:]
    t0 = edit_table([edits[0].feature_edit()], 3, d_sae=D_SAE)
    h0_new = h0 + resae.intervention_delta(LAYERS[0], h0, None, t0)
    t1 = edit_table([e.feature_edit() for e in edits[1:]], 3, d_sae=D_SAE)
    h1 = acts[LAYERS[1]][3:]
    h1_new = h1 + resae.intervention_delta(LAYERS[1], h1, h0_new, t1) + torch.tensor(vector)
    torch.testing.assert_close(got[LAYERS[0]][3:], h0_new, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[LAYERS[1]][3:], h1_new, atol=ATOL, rtol=0)
    for layer in LAYERS:  # unsteered tokens: bit-identical
        assert torch.equal(got[layer][:3], clean[layer][:3])


def test_phases_select_rows_by_position() -> None:
    tables = SteeringTables(tiny_resae(), max_tokens=8, max_rows=5)
    spec = SteeringSpec(edits=(SteerEdit(LAYERS[0], 1, "add", 1.0, "generation"),))
    # prompt of 4; this step computes positions 3, 4 (last prompt token + first generated)
    _step(tables, [spec], [2], [3], [4])
    rows = tables.token_rows[:2].tolist()
    assert rows[0] == 0 and rows[1] != 0


def test_rows_shared_released_and_capped() -> None:
    tables = SteeringTables(tiny_resae(), max_tokens=8, max_rows=3)  # 2 usable rows
    a = SteeringSpec(edits=(SteerEdit(LAYERS[0], 1, "add", 1.0),))
    b = SteeringSpec(edits=(SteerEdit(LAYERS[0], 2, "add", 1.0),))
    c = SteeringSpec(edits=(SteerEdit(LAYERS[0], 3, "add", 1.0),))
    ra, ra2 = tables.claim("a", a), tables.claim("a2", a)
    assert ra == ra2 and tables.rows_in_use == 1          # same config, same row
    tables.claim("b", b)
    with pytest.raises(TablesFullError):
        tables.claim("c", c)
    tables.release("b")
    assert tables.rows_in_use == 1
    row = tables.claim("c", c).prompt
    assert tables.add_vec[0, row].abs().sum() > 0
    tables.release("a"), tables.release("a2"), tables.release("c")
    assert tables.rows_in_use == 0 and tables.add_vec.abs().sum() == 0


def test_inactive_step_leaves_hidden_untouched() -> None:
    tables = SteeringTables(tiny_resae(), max_tokens=8, max_rows=3)
    _step(tables, [None, None], [2, 1], [0, 5], [2, 4])
    assert not tables.active
    hidden = torch.randn(3, D_MODEL)
    before = hidden.clone()
    tables.apply(0, hidden, torch.randn(3, D_MODEL))
    assert torch.equal(hidden, before)


def test_spec_validation_and_salt() -> None:
    d_sae = [D_SAE] * len(LAYERS)
    with pytest.raises(InterventionError, match="layer=99"):
        SteeringSpec(edits=(SteerEdit(99, 1),)).validate(LAYERS, d_sae, D_MODEL)
    with pytest.raises(InterventionError, match="feature=32"):
        SteeringSpec(edits=(SteerEdit(LAYERS[0], D_SAE),)).validate(LAYERS, d_sae, D_MODEL)
    with pytest.raises(InterventionError, match="finite"):
        SteerEdit(LAYERS[0], 1, "add", float("nan"))
    with pytest.raises(InterventionError, match="at most"):
        SteeringSpec(edits=tuple(SteerEdit(LAYERS[0], f) for f in range(9))).validate(
            LAYERS, d_sae, D_MODEL)
    spec = SteeringSpec(edits=(SteerEdit(LAYERS[0], 1, "clamp", 2.0),),
                        monitor=MonitorSpec((LAYERS[1],), top_k=4), key="x")
    back = SteeringSpec.from_extra_args(spec.to_extra_args())
    assert back == spec
    same = SteeringSpec(edits=spec.edits, key="other")
    assert spec.cache_salt() == same.cache_salt() is not None   # monitor/key not in the hash
    assert SteeringSpec(monitor=MonitorSpec((LAYERS[0],))).cache_salt() is None


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_whole_batch_fast_path_matches_intervention_delta(architecture: str) -> None:
    """Every token encoded (a decode step of steered requests): no gather/scatter path."""
    resae = tiny_resae("resae", architecture)
    tables = SteeringTables(resae, max_tokens=16, max_rows=9)
    edits = (SteerEdit(LAYERS[1], 5, "clamp", 1.5), SteerEdit(LAYERS[1], 2, "add", 0.5),
             SteerEdit(LAYERS[1], 9, "ablate"))
    spec = SteeringSpec(edits=edits)
    _step(tables, [spec, spec], [2, 2], [5, 5], [3, 3])
    acts = tiny_acts(4)
    _, got = _run_layers(tables, acts)
    h0, h1 = acts[LAYERS[0]], acts[LAYERS[1]]
    table = edit_table([e.feature_edit() for e in edits], 4, d_sae=D_SAE)
    want = h1 + resae.intervention_delta(LAYERS[1], h1, h0, table)
    torch.testing.assert_close(got[LAYERS[1]], want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[LAYERS[0]], h0, atol=ATOL, rtol=0)   # no edits there


def _mixed_step(tables: SteeringTables, padding: int) -> int:
    """Five requests (plain, add, clamp+scale+ablate, vectors by phase, monitor only) in one
    pass with prompt and generated tokens and ``padding`` pad tokens; the pass's token count."""
    vector = tuple(float(x) for x in torch.linspace(-1, 1, D_MODEL))
    specs: list[SteeringSpec | None] = [
        None,
        SteeringSpec(edits=(SteerEdit(LAYERS[0], 3, "add", 2.0),)),
        SteeringSpec(edits=(SteerEdit(LAYERS[1], 5, "clamp", 1.5),
                            SteerEdit(LAYERS[1], 7, "scale", 3.0),
                            SteerEdit(LAYERS[0], 9, "ablate"))),
        SteeringSpec(edits=(SteerEdit(LAYERS[1], 11, "clamp", 0.0, "generation"),),
                     vectors=(SteerVector(LAYERS[0], vector, "prompt"),)),
        SteeringSpec(monitor=MonitorSpec((LAYERS[1],)), key="m"),
    ]
    counts, starts, prompts = [3, 2, 4, 3, 2], [0, 5, 0, 2, 0], [3, 4, 4, 4, 2]
    _step(tables, specs, counts, starts, prompts)
    n = sum(counts) + padding
    if padding:          # the same rows, now for a padded pass
        rows = [tables.rows_of(f"r{j}") for j in range(len(specs))]
        tables.prepare_step(n, rows, np.array(counts), np.array(starts),  # type: ignore[arg-type]
                            np.array(prompts))
    return n


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
@pytest.mark.parametrize("mode", ["resae", "layerwise"])
@pytest.mark.parametrize("skip_inactive", [True, False])
def test_graph_body_matches_eager_body(mode: str, architecture: str,
                                       skip_inactive: bool) -> None:
    """The fixed-shape body (what CUDA graphs capture) equals the eager body (the oracle):
    edits, untouched tokens and padding, and the monitor's captures. ``skip_inactive=False``
    runs its masked arithmetic at every layer, as a replayed graph with every flag set does."""
    resae = tiny_resae(mode, architecture)  # type: ignore[arg-type]
    results = {}
    for graph in (False, True):
        tables = SteeringTables(resae, max_tokens=24, max_rows=11, graph_body=graph,
                                screen=False)
        tables.skip_inactive = skip_inactive or not graph
        n = _mixed_step(tables, padding=3)
        acts = tiny_acts(n, seed=4)
        clean, got = _run_layers(tables, acts)
        captures = tables.take_captures()
        results[graph] = (clean, got, captures)
    (_, eager, caps_eager), (clean, graph_out, caps_graph) = results[False], results[True]
    for layer in LAYERS:
        torch.testing.assert_close(graph_out[layer], eager[layer], atol=ATOL, rtol=0)
        assert torch.equal(graph_out[layer][:3], clean[layer][:3])      # unsteered: exact
        assert torch.equal(graph_out[layer][-3:], clean[layer][-3:])    # padding: exact
    assert caps_graph.keys() == caps_eager.keys() == {1}
    idx_e, cap_e = caps_eager[1]
    idx_g, cap_g = caps_graph[1]
    assert idx_e.tolist() == idx_g.tolist() == [12, 13]
    torch.testing.assert_close(cap_g.h, cap_e.h, atol=ATOL, rtol=0)
    assert (cap_g.h_prev is None) == (cap_e.h_prev is None) == (mode == "layerwise")


def test_graph_body_inactive_pass_is_exact() -> None:
    tables = SteeringTables(tiny_resae(), max_tokens=8, max_rows=3, graph_body=True)
    _step(tables, [None, None], [2, 1], [0, 5], [2, 4])
    assert not tables.active and not tables._flags.np.any()
    hidden = torch.randn(3, D_MODEL)
    before = hidden.clone()
    tables.apply(0, hidden, torch.randn(3, D_MODEL))
    assert torch.equal(hidden, before)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
@pytest.mark.parametrize("graph_body", [False, True])
def test_engine_op_matches_exported_intervention_graph(tmp_path: Path, architecture: str,
                                                       graph_body: bool) -> None:
    """One meaning of edits at a residual layer: the engine's op body (layer 1 reads layer 0
    as the edits left it) equals the export's intervention graph, as a torch module and as
    an onnxruntime session of a real export, within 1e-4 (float32)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    resae = tiny_resae("resae", architecture)
    manifest = export_resae(resae, tmp_path / "export", ExportConfig(graphs=("intervention",)))
    edits = (SteerEdit(LAYERS[0], 3, "add", 2.0), SteerEdit(LAYERS[0], 5, "clamp", 4.0),
             SteerEdit(LAYERS[1], 5, "clamp", 1.5), SteerEdit(LAYERS[1], 7, "scale", 3.0),
             SteerEdit(LAYERS[1], 9, "ablate"))
    tables = SteeringTables(resae, max_tokens=16, max_rows=9, graph_body=graph_body)
    # request 0 unsteered (2 tokens), request 1 steered (5 tokens)
    _step(tables, [None, SteeringSpec(edits=edits)], [2, 5], [0, 0], [2, 5])
    acts = tiny_acts(7, seed=11)
    before, after = _run_layers(tables, acts)
    engine = {L: after[L] - before[L] for L in LAYERS}

    edit_tables = {L: edit_table([e.feature_edit() for e in edits if e.layer == L], 7,
                                 d_sae=D_SAE) for L in LAYERS}
    for t in edit_tables.values():   # the unsteered request edits nothing
        t.op[:2] = 0
    flat = [acts[L] for L in LAYERS] + [
        t for L in LAYERS for t in (edit_tables[L].feature, edit_tables[L].op,
                                    edit_tables[L].value)]
    with torch.no_grad():
        module = graph_module("intervention", resae)(*nest_inputs("intervention", flat,
                                                                  len(LAYERS)))
        oracle = resae.intervention_deltas(acts, edit_tables)
    entry = manifest.graphs[0]
    session = ort.InferenceSession(str(manifest.path(entry)),
                                   providers=["CPUExecutionProvider"])
    onnx = session.run(entry.spec.output_names,
                       dict(zip(entry.spec.input_names, (t.numpy() for t in flat), strict=True)))
    assert torch.count_nonzero(oracle[LAYERS[1]][2:]) > 0
    for i, L in enumerate(LAYERS):
        for got in (module[i], torch.from_numpy(onnx[i]), oracle[L]):
            torch.testing.assert_close(got, engine[L], atol=1e-4, rtol=0)
    # the clean previous layer would mean something else here
    with torch.no_grad():
        clean = resae.intervention_delta(LAYERS[1], acts[LAYERS[1]], acts[LAYERS[0]],
                                         edit_tables[LAYERS[1]])
    assert float((clean - engine[LAYERS[1]]).abs().max()) > 1e-3


# ---------------------------------------------------------------- when gates (conditions)


def _gate(c: Condition) -> Gate:
    return Gate(c.layer, c.feature, c.value, c.sticky, c.include_out_of_distribution)


def _oracle(resae: ReSAE, spec: SteeringSpec, acts: dict[int, torch.Tensor],
            positions: list[int], num_prompt: int, context: TrainingContext
            ) -> dict[int, torch.Tensor]:
    """Edited block outputs of one request's tokens (one sequence, in order) by
    ``ReSAE.intervention_deltas`` with gates; phases by zeroed table ops. Ungated vectors are
    gated by a gate that always holds."""
    n = len(positions)
    prompt = torch.tensor(positions) < num_prompt

    def table(edits: list[SteerEdit]) -> EditTable:
        t = edit_table([e.feature_edit() for e in edits], n, d_sae=D_SAE)
        for slot, e in enumerate(edits):
            if e.phase != "all":
                t.op[prompt if e.phase == "generation" else ~prompt, slot] = 0
        return t

    def phase_mask(phase: str) -> torch.Tensor:
        return {"all": torch.ones(n, dtype=torch.bool), "prompt": prompt,
                "generation": ~prompt}[phase]

    always = Gate(LAYERS[0], 0, -1e30, False, True)
    tables = {L: table([e for e in spec.edits if e.layer == L and e.when is None])
              for L in LAYERS}
    gated = [GatedEdit(_gate(e.when), e.layer, table([e])) for e in spec.edits if e.when]
    gated += [GatedEdit(always if v.when is None else _gate(v.when), v.layer, None,
                        phase_mask(v.phase)[:, None] * torch.tensor(v.vector))
              for v in spec.vectors]
    with torch.no_grad():
        deltas = resae.intervention_deltas(acts, tables, gated=gated, context=context,
                                           positions=positions)
    return {L: acts[L] + deltas[L] for L in LAYERS}


def _codes(resae: ReSAE, acts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Dense codes of unedited inputs (what an edit-free pass reads at each layer)."""
    with torch.no_grad():
        return resae.encode_dense(acts)


def _splitting(z: torch.Tensor, avoid_first: bool = True) -> tuple[int, float]:
    """A feature and value whose condition holds on some tokens and not on others (and not
    only on token 0); the value lies halfway between codes, away from rounding."""
    start = 1 if avoid_first else 0
    for f in (z[start:] > 0).sum(0).argsort(descending=True).tolist():
        col = z[start:, f]
        if 0 < int((col > 0).sum()) < len(col):
            return f, 0.5 * float(col[col > 0].min())
    raise AssertionError("no feature fires on some tokens only")


def _run(tables: SteeringTables, names: list[str], specs: list[SteeringSpec | None],
         acts: dict[int, torch.Tensor], counts: list[int], starts: list[int],
         num_prompt: list[int]) -> dict[int, torch.Tensor]:
    rows = [tables.claim(name, spec) for name, spec in zip(names, specs, strict=True)]
    tables.prepare_step(sum(counts), rows, np.array(counts), np.array(starts),
                        np.array(num_prompt))
    return _run_layers(tables, acts)[1]


BODIES = pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])


def _slice(acts: dict[int, torch.Tensor], span: slice) -> dict[int, torch.Tensor]:
    return {L: a[span] for L, a in acts.items()}


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
@pytest.mark.parametrize("mode", ["resae", "layerwise"])
def test_gated_edits_match_oracle_in_both_bodies(mode: str, architecture: str) -> None:
    """Gated clamp / add / vector with conditions at the same and an earlier layer, beside an
    unsteered request and padding: eager == graph == oracle; unsteered tokens exact."""
    resae = tiny_resae(mode, architecture)  # type: ignore[arg-type]
    acts = tiny_acts(17, seed=5)               # 3 plain + 7 + 5 steered + 2 padding
    z = _codes(resae, acts)
    f0, v0 = _splitting(z[LAYERS[0]][3:10])
    early = Condition(LAYERS[0], f0, v0)
    vector = tuple(float(x) for x in torch.linspace(-1, 1, D_MODEL))
    spec_a = SteeringSpec(
        edits=(SteerEdit(LAYERS[1], 5, "clamp", 1.5, when=early),
               SteerEdit(LAYERS[1], 2, "add", 3.0, when=early),
               SteerEdit(LAYERS[1], 7, "scale", 2.0),
               SteerEdit(LAYERS[0], 3, "add", 2.0, when=early)),      # same-layer gated add
        vectors=(SteerVector(LAYERS[0], vector, when=early),))
    # same-layer condition at layer 1, on codes that layer 0's edits do not touch here
    f1, v1 = _splitting(z[LAYERS[1]][10:15])
    late = Condition(LAYERS[1], f1, v1, include_out_of_distribution=True)
    spec_b = SteeringSpec(edits=(SteerEdit(LAYERS[1], f1, "ablate", when=late),
                                 SteerEdit(LAYERS[1], 9, "add", -2.0, "generation", when=late)))
    counts, starts, prompts = [3, 7, 5], [0, 0, 4], [3, 7, 6]
    outs, cleans = {}, {}
    for graph in (False, True):
        tables = SteeringTables(resae, max_tokens=24, max_rows=9, graph_body=graph,
                                screen=False)
        rows = [tables.claim(f"r{j}", s) for j, s in enumerate([None, spec_a, spec_b])]
        tables.prepare_step(17, rows, np.array(counts), np.array(starts), np.array(prompts))
        cleans[graph], outs[graph] = _run_layers(tables, acts)
    for layer in LAYERS:
        torch.testing.assert_close(outs[True][layer], outs[False][layer], atol=ATOL, rtol=0)
        for got, clean in zip(outs.values(), cleans.values(), strict=True):
            assert torch.equal(got[layer][:3], clean[layer][:3])
            assert torch.equal(got[layer][15:], clean[layer][15:])
    ctx = TrainingContext.unknown()
    want_a = _oracle(resae, spec_a, _slice(acts, slice(3, 10)), list(range(7)), 7, ctx)
    want_b = _oracle(resae, spec_b, _slice(acts, slice(10, 15)), list(range(4, 9)), 6, ctx)
    for layer in LAYERS:
        torch.testing.assert_close(outs[False][layer][3:10], want_a[layer], atol=ATOL, rtol=0)
        torch.testing.assert_close(outs[False][layer][10:15], want_b[layer], atol=ATOL, rtol=0)
    # the gates did something on some tokens and nothing on others
    ungated = _oracle(resae, SteeringSpec(edits=(SteerEdit(LAYERS[1], 7, "scale", 2.0),)),
                      _slice(acts, slice(3, 10)), list(range(7)), 7, ctx)
    moved = (want_a[LAYERS[1]] - ungated[LAYERS[1]]).abs().sum(1) > 1e-4
    assert 0 < int(moved.sum()) < 7


@BODIES
def test_sticky_condition_latches_within_and_across_passes(graph: bool) -> None:
    """A sticky condition at layer 0 that holds once, on a prompt token, gates a generation
    edit at layer 1 on every later token: later tokens of the same pass, and the next pass.
    Without ``sticky`` the edit would apply nowhere after it."""
    resae = tiny_resae("resae")
    n = 10
    acts = tiny_acts(n, seed=8)
    z0 = _codes(resae, acts)[LAYERS[0]]
    # a feature whose largest code is on prompt token 1..3 and which is below it on the rest
    feature = next(f for f in z0[1:4].max(0).values.argsort(descending=True).tolist()
                   if int(z0[:, f].argmax()) in (1, 2, 3)
                   and z0[:, f].topk(2).values.diff().abs() > 1e-2)
    t_hold = int(z0[:, feature].argmax())
    top2 = z0[:, feature].topk(2).values
    cond = Condition(LAYERS[0], feature, float(top2.mean()), sticky=True)
    spec = SteeringSpec(edits=(SteerEdit(LAYERS[1], 4, "add", 3.0, when=cond),
                               SteerEdit(LAYERS[1], 6, "clamp", 1.0, "generation", when=cond)))
    # the bfloat16 screen reads the codes on CPU (eager); an unsteered request comes first,
    # so the eager body encodes a subset of the pass
    tables = SteeringTables(resae, max_tokens=16, max_rows=5, graph_body=graph)
    other = tiny_acts(2, seed=1)
    # pass 1: positions 0..5 (prompt of 5 + first generated), pass 2: positions 6..9
    first = _run(tables, ["p", "r"], [None, spec],
                 {L: torch.cat([other[L], acts[L][:6]]) for L in LAYERS}, [2, 6], [7, 0], [3, 5])
    second = _run(tables, ["p", "r"], [None, spec],
                  {L: torch.cat([other[L], acts[L][6:]]) for L in LAYERS}, [2, 4], [9, 6], [3, 5])
    got = {L: torch.cat([first[L][2:], second[L][2:]]) for L in LAYERS}
    want = _oracle(resae, spec, acts, list(range(n)), 5, TrainingContext.unknown())
    for L in LAYERS:
        torch.testing.assert_close(got[L], want[L], atol=ATOL, rtol=0)
    moved = (got[LAYERS[1]] - acts[LAYERS[1]]).abs().sum(1) > 1e-4
    assert moved.tolist() == [t >= t_hold for t in range(n)]


@BODIES
def test_requests_sharing_a_row_keep_separate_latches(graph: bool) -> None:
    resae = tiny_resae("layerwise")
    acts = tiny_acts(8, seed=2)
    z0 = _codes(resae, acts)[LAYERS[0]]
    # a feature that fires on a token of request a (tokens 1..3) and never in request b
    feature = next(f for f in range(D_SAE) if z0[4:, f].max() == 0
                   and z0[1:4, f].topk(2).values.diff().abs() > 1e-2)
    top2 = z0[1:4, feature].topk(2).values
    cond = Condition(LAYERS[0], feature, float(top2.mean()), sticky=True)
    spec = SteeringSpec(edits=(SteerEdit(LAYERS[1], 4, "add", 3.0, when=cond),))
    tables = SteeringTables(resae, max_tokens=16, max_rows=5, graph_body=graph, screen=False)
    a, b = tables.claim("a", spec), tables.claim("b", spec)
    assert a.prompt == b.prompt and a.slot != b.slot and 0 not in (a.slot, b.slot)
    first = _run(tables, ["a", "b"], [spec, spec], _slice(acts, slice(0, 8)), [4, 4], [0, 0],
                 [4, 4])
    step = tiny_acts(2, seed=9)                # one decode token each
    second = _run(tables, ["a", "b"], [spec, spec], step, [1, 1], [4, 4], [4, 4])
    moved = ((first[LAYERS[1]] - acts[LAYERS[1]]).abs().sum(1) > 1e-4).tolist()
    t_hold = 1 + int(z0[1:4, feature].argmax())
    assert moved == [t >= t_hold for t in range(4)] + [False] * 4
    moved2 = ((second[LAYERS[1]] - step[LAYERS[1]]).abs().sum(1) > 1e-4).tolist()
    z_step = _codes(resae, step)[LAYERS[0]][1, feature]
    assert moved2 == [True, bool(z_step >= cond.value)]
    # a fresh request on the same row starts with a clear latch
    tables.release("a")
    c = tables.claim("c", spec)
    assert c.prompt == b.prompt and int(tables.gates.latch[c.slot].min()) == NEVER


@BODIES
def test_out_of_distribution_positions_never_satisfy_unless_asked(graph: bool) -> None:
    """Position 0 (training skipped it) and a norm outlier at the condition layer: no gate
    there by default; with ``include_out_of_distribution`` they count like any token."""
    resae = tiny_resae("layerwise")
    acts = tiny_acts(6, seed=6)
    for L in LAYERS:
        acts[L][3] *= 20.0                      # token 3: a norm outlier
    norms = [float(acts[L].norm(dim=1).median()) for L in LAYERS]
    ctx = TrainingContext(True, True, 4.0, tuple(norms))
    assert ctx.reasons(0, list(range(6)), acts[LAYERS[0]].norm(dim=1).tolist()).tolist() == [
        1, 0, 0, 2, 0, 0]
    results = {}
    for ood in (False, True):
        cond = Condition(LAYERS[0], 0, 0.0, include_out_of_distribution=ood)  # holds if in
        spec = SteeringSpec(edits=(SteerEdit(LAYERS[1], 4, "add", 3.0, when=cond),))
        tables = SteeringTables(resae, max_tokens=8, max_rows=3, graph_body=graph,
                                screen=False, context=ctx)
        got = _run(tables, ["r"], [spec], acts, [6], [0], [6])
        want = _oracle(resae, spec, acts, list(range(6)), 6, ctx)
        torch.testing.assert_close(got[LAYERS[1]], want[LAYERS[1]], atol=ATOL, rtol=0)
        results[ood] = ((got[LAYERS[1]] - acts[LAYERS[1]]).abs().sum(1) > 1e-4).tolist()
    assert results[False] == [False, True, True, False, True, True]
    assert results[True] == [True] * 6


@BODIES
def test_condition_that_never_holds_is_bitwise_unsteered(graph: bool) -> None:
    resae = tiny_resae("resae")
    acts = tiny_acts(7, seed=12)
    never = Condition(LAYERS[0], 1, 1e9, sticky=True, include_out_of_distribution=True)
    vector = tuple(float(x) for x in torch.linspace(-1, 1, D_MODEL))
    spec = SteeringSpec(edits=(SteerEdit(LAYERS[1], 4, "add", 3.0, when=never),
                               SteerEdit(LAYERS[0], 6, "clamp", 2.0, when=never),
                               SteerEdit(LAYERS[1], 9, "ablate", when=never)),
                        vectors=(SteerVector(LAYERS[1], vector, when=never),))
    outs = []
    for s in (None, spec):
        tables = SteeringTables(resae, max_tokens=8, max_rows=3, graph_body=graph,
                                screen=False)
        tables.skip_inactive = False
        torch.manual_seed(0)                   # the same hidden / residual split
        outs.append(_run(tables, ["r"], [s], {L: a.clone() for L, a in acts.items()}, [7],
                         [0], [7]))
    for L in LAYERS:
        assert torch.equal(outs[0][L], outs[1][L])


def test_rows_differ_by_condition() -> None:
    tables = SteeringTables(tiny_resae(), max_tokens=8, max_rows=5)
    edit = SteerEdit(LAYERS[1], 1, "add", 1.0)
    plain = tables.claim("a", SteeringSpec(edits=(edit,)))
    gated = tables.claim("b", SteeringSpec(edits=(replace(edit, when=Condition(
        LAYERS[0], 2, 0.5)),)))
    other = tables.claim("c", SteeringSpec(edits=(replace(edit, when=Condition(
        LAYERS[0], 2, 0.5, sticky=True)),)))
    assert len({plain.prompt, gated.prompt, other.prompt}) == 3
    assert plain.slot == gated.slot == 0 and other.slot != 0
    for name in "abc":
        tables.release(name)
    assert tables.rows_in_use == 0 and not tables.gates.rows
    assert tables.gated_vec.abs().sum() == 0
