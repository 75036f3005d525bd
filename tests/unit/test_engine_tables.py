"""The engine's table math against the torch oracle ``ReSAE.intervention_delta`` (no vLLM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resae_serve.engine.spec import MonitorSpec, SteerEdit, SteeringSpec, SteerVector
from resae_serve.engine.tables import SteeringTables, TablesFullError
from resae_serve.export.convert import export_resae
from resae_serve.export.graphs import graph_module, nest_inputs
from resae_serve.export.spec import ExportConfig
from resae_serve.interventions import InterventionError, edit_table
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
