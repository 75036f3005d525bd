"""``report.md``: the evaluation report as readable tables."""

from __future__ import annotations

from typing import Any


def fmt(value: float | None, spec: str = ".4f") -> str:
    """``value`` formatted by ``spec``; an en dash for None."""
    return "–" if value is None else format(value, spec)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines, with a blank line after it."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def render_markdown(report: dict[str, Any], plots: list[str]) -> str:
    """The whole report as Markdown."""
    dicts: dict[str, Any] = report["dictionaries"]
    settings = report["settings"]
    lines = [
        "# Dictionary evaluation", "",
        f"Model `{report['model']}`, corpus `{report['corpus']}` ({report['split']} split); "
        f"splicing on {settings['splice_windows']} windows of {settings['context_size']} tokens "
        f"({report['splice_tokens']} spliced positions). resae-serve {report['package_version']}"
        f", {report['created']}.", "",
    ]
    lines += ["| dictionary | mode | layers | architecture | k | d_sae | tokens | affine maps |",
              "|---|---|---|---|---|---|---|---|"]
    for name, d in dicts.items():
        lines.append(f"| {name} | {d['mode']} | {d['layers']} | {d['architecture']} | {d['k']} "
                     f"| {d['d_sae'][0]} | {d['tokens_trained']} | {d['affine_maps_from']} |")
    lines += ["", "## Reconstruction (held-out)", "",
              "FVE in activation space (through the chain for a ReSAE); local FVE: a ReSAE "
              "layer rebuilt from the true previous layer, A h_prev + c + σ D(z); residual "
              "space is r = h − A h_prev − c.", ""]
    rows = [[name, str(r["layer"]), fmt(r["fve"]), fmt(r.get("local_fve")),
             fmt(r["residual_fve"]), fmt(r["input_fve"]),
             fmt(r["mse"], ".4g"), fmt(r["cosine"]), fmt(r["l0"], ".1f"),
             fmt(r["dead_fraction"], ".1%"), fmt(r["dense_fraction"], ".1%"), fmt(r["shrinkage"]),
             str(r["n_tokens"])]
            for name, d in dicts.items() for r in d["reconstruction"]]
    lines += md_table(["dictionary", "layer", "FVE", "local FVE", "residual FVE", "SAE-input FVE",
                     "MSE",
                     "cosine", "L0", "dead", "dense", "‖x̂‖/‖x‖", "tokens"], rows)
    lines += ["## Splicing", "",
              "ΔCE = CE_spliced − CE_clean (nats/token); KL(p_clean ‖ p_spliced) per token; CE "
              "recovered against mean ablation of the same layers; interaction = ΔCE_joint − "
              "Σ ΔCE_single. Teacher-forced joint replacement always equals replacing the last "
              "layer alone with the same x̂ (the blocks after it read only the stream it "
              "writes), so its interaction is −Σ of the earlier layers' ΔCE by construction; "
              "teacher-forced additive keeps every encoder on the clean pass but adds each "
              "layer's own error x̂ − h to the stream as it arrives, so all errors reach the "
              "output; online replacement is where encoders read the spliced stream. In a "
              "ReSAE a single layer's x̂ comes through the chain, with the upstream layers' "
              "errors; 'local' rebuilds it from the clean previous layer instead.", ""]
    rows = []
    for name, d in dicts.items():
        s = d["splicing"]
        conditions = [(f"layer {layer} alone", r) for layer, r in s["single"].items()]
        conditions += [(f"layer {layer} alone, local", r)
                       for layer, r in s.get("local", {}).items()]
        conditions += [(f"joint, {mode.replace('_', '-')}", r) for mode, r in s["joint"].items()]
        for label, r in conditions:
            rows.append([name, label, fmt(s["ce_clean"]), fmt(r["ce"]), fmt(r["delta_ce"]),
                         fmt(r["kl"]), fmt(r["ce_ablate"]), fmt(r["ce_recovered"], ".3f")])
    lines += md_table(["dictionary", "condition", "CE clean", "CE spliced", "ΔCE", "KL",
                     "CE ablated", "CE recovered"], rows)
    rows = [[name, fmt(d["splicing"]["sum_single_delta_ce"]),
             *(fmt(d["splicing"]["interaction"].get(mode)) for mode in settings["modes"])]
            for name, d in dicts.items()]
    lines += md_table(["dictionary", "Σ ΔCE single",
                     *(f"interaction ({m.replace('_', '-')})" for m in settings["modes"])], rows)
    lines += ["## Redundancy", "",
              "Per latent of a later layer: max |cos| of its decoder row to the previous layer's "
              "rows, raw and after mapping those by A.", ""]
    rows = [[name, f"{r['layer']} vs {r['previous']}", fmt(r["raw>0.7"], ".1%"),
             fmt(r["raw>0.9"], ".1%"), fmt(r["mapped>0.7"], ".1%"), fmt(r["mapped>0.9"], ".1%"),
             fmt(r["median_raw"], ".3f"), fmt(r["median_mapped"], ".3f")]
            for name, d in dicts.items() for r in d["redundancy"]]
    lines += md_table(["dictionary", "layers", "raw > 0.7", "raw > 0.9", "mapped > 0.7",
                     "mapped > 0.9", "median raw", "median mapped"], rows)
    lines += ["## Linear propagation", "",
              "A feature direction added at layer m (α = the layer's mean active code) vs the "
              "actual change of h at the next dictionary layer; 'new' is the next SAE's "
              "decoded change relative to it.", ""]
    rows = [[name, f"{r['layer']} → {r['next_layer']}", str(r["n_features"]),
             fmt(r["alpha"], ".2f"),
             fmt(r["cosine"], ".3f"), fmt(r["norm_ratio"], ".3f"), fmt(r["linear_r2"], ".3f"),
             fmt(r["new_fraction"], ".3f"), fmt(r["new_latents"], ".2f")]
            for name, d in dicts.items() for r in d["propagation"]]
    lines += md_table(["dictionary", "layers", "features", "α", "cos(Δh, Aδ)", "‖Δh‖/‖Aδ‖",
                     "R²", "new fraction", "latents switched on"], rows)
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    return "\n".join(lines)
